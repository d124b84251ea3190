from django.core.management.base import BaseCommand

from apps.accounts.models import ApiToken
from apps.accounts.services import token_state

COLUMNS = "{prefix:<13} {user:<16} {name:<16} {scopes:<24} {state:<8} {expires:<17} {last_used:<17}"


def _when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else "-"


class Command(BaseCommand):
    help = "List API tokens by prefix, with user, scopes, state, expiry and last use. Never prints a token."

    def add_arguments(self, parser):
        parser.add_argument("--user", help="only this user's tokens")
        parser.add_argument(
            "--active", action="store_true", help="leave out revoked and expired tokens"
        )

    def handle(self, *args, **options):
        tokens = ApiToken.objects.select_related("user").order_by(
            "user__username", "created"
        )
        if options["user"]:
            tokens = tokens.filter(user__username=options["user"])
        header = COLUMNS.format(
            prefix="PREFIX",
            user="USER",
            name="NAME",
            scopes="SCOPES",
            state="STATE",
            expires="EXPIRES",
            last_used="LAST USED",
        )
        self.stdout.write(header.rstrip())
        for token in tokens:
            state = token_state(token)
            if options["active"] and state != "active":
                continue
            row = COLUMNS.format(
                prefix=token.prefix,
                user=token.user.username,
                name=token.name,
                scopes=",".join(token.scopes),
                state=state,
                expires=_when(token.expires),
                last_used=_when(token.last_used),
            )
            self.stdout.write(row.rstrip())
