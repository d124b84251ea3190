import datetime as dt
import logging

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from apps.accounts.models import ApiToken

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = "Create an API token for a user and print it once. Only its hash is stored."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--name", default="cli", help="a label to tell this token apart"
        )
        parser.add_argument(
            "--create-user", action="store_true", help="create the user when missing"
        )
        parser.add_argument(
            "--staff",
            action="store_true",
            help="with --create-user: make the user staff",
        )
        parser.add_argument(
            "--scopes",
            default="read,infer,serve,admin",
            help="comma-separated: read, infer, serve, admin",
        )
        parser.add_argument(
            "--expires-in",
            type=float,
            metavar="DAYS",
            help="days until the token expires (default: never)",
        )

    def handle(self, *args, **options):
        User = get_user_model()
        user = User.objects.filter(username=options["username"]).first()
        if user is None:
            if not options["create_user"]:
                raise CommandError(
                    f"user {options['username']!r} not found; pass --create-user to create it"
                )
            user = User.objects.create_user(
                options["username"], is_staff=options["staff"]
            )
        scopes = [s.strip() for s in options["scopes"].split(",") if s.strip()]
        if not scopes:
            raise CommandError(
                "--scopes is empty; name one or more of read, infer, serve, admin"
            )
        unknown = set(scopes) - set(ApiToken.Scope.values)
        if unknown:
            raise CommandError(
                f"unknown scopes {sorted(unknown)}; use read, infer, serve or admin"
            )
        expires = None
        if options["expires_in"] is not None:
            if options["expires_in"] <= 0:
                raise CommandError(
                    f"--expires-in {options['expires_in']:g} must be a positive number of days"
                )
            expires = timezone.now() + dt.timedelta(days=options["expires_in"])
        token, plain = ApiToken.issue(
            user=user, name=options["name"], scopes=scopes, expires=expires
        )
        logger.info(
            "api token id=%s (%s…) created for user %s with scopes %s, expires %s",
            token.pk,
            token.prefix,
            user.pk,
            ",".join(scopes),
            expires or "never",
        )
        self.stdout.write(plain)
