from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.models import ApiToken


class Command(BaseCommand):
    help = "Create an API token for a user and print it once. Only its hash is stored."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="a label to tell this token apart")
        parser.add_argument("--create-user", action="store_true", help="create the user when missing")
        parser.add_argument("--staff", action="store_true", help="with --create-user: make the user staff")
        parser.add_argument(
            "--scopes", default="read,infer,serve,admin", help="comma-separated: read, infer, serve, admin"
        )

    def handle(self, *args, **options):
        User = get_user_model()
        user = User.objects.filter(username=options["username"]).first()
        if user is None:
            if not options["create_user"]:
                raise CommandError(f"user {options['username']!r} not found; pass --create-user to create it")
            user = User.objects.create_user(options["username"], is_staff=options["staff"])
        scopes = [s.strip() for s in options["scopes"].split(",") if s.strip()]
        unknown = set(scopes) - set(ApiToken.Scope.values)
        if unknown:
            raise CommandError(f"unknown scopes {sorted(unknown)}; use read, infer, serve or admin")
        _, plain = ApiToken.issue(user=user, name=options["name"], scopes=scopes)
        self.stdout.write(plain)
