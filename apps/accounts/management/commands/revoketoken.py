import getpass

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.models import ApiToken
from apps.accounts.services import revoke_tokens
from apps.accounts.tokens import hash_token

# Plain tokens are longer than the stored prefix; a longer argument is a whole token.
PREFIX_LENGTH = 12


class Command(BaseCommand):
    help = (
        "Revoke an API token by its prefix (as `listtokens` shows it) or its full value, "
        "or every token of a user with --user. A revoked token is rejected on its next request."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "token",
            nargs="?",
            help="the token's prefix, such as grid_Ab12Cd3, or the whole token",
        )
        parser.add_argument("--user", help="revoke every active token of this user")

    def handle(self, *args, **options):
        token, username = options["token"], options["user"]
        if bool(token) == bool(username):
            raise CommandError(
                "pass a token prefix or --user USER, not both or neither"
            )
        if username:
            tokens = self._tokens_of(username)
        else:
            tokens = self._tokens_matching(token)
        revoked = revoke_tokens(
            tokens=tokens, actor=f"manage.py by {getpass.getuser()}"
        )
        for item in revoked:
            self.stdout.write(
                f"revoked {item.prefix}… ({item.name}) of {item.user.username}"
            )
        if not revoked:
            self.stdout.write("no active token matched; nothing revoked")

    def _tokens_of(self, username: str):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"user {username!r} not found")
        return ApiToken.objects.filter(user=user)

    def _tokens_matching(self, value: str):
        if len(value) > PREFIX_LENGTH:
            tokens = ApiToken.objects.filter(token_hash=hash_token(value))
            if not tokens.exists():
                raise CommandError(
                    "no token has this value; `manage.py listtokens` shows the tokens by prefix"
                )
            return tokens
        tokens = ApiToken.objects.filter(prefix__startswith=value, revoked__isnull=True)
        count = tokens.count()
        if count == 0:
            raise CommandError(
                f"no active token starts with {value!r}; `manage.py listtokens` shows the tokens"
            )
        if count > 1:
            prefixes = ", ".join(tokens.values_list("prefix", flat=True))
            raise CommandError(
                f"{count} active tokens start with {value!r} ({prefixes}); pass more characters"
            )
        return tokens
