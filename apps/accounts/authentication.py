"""Bearer-token authentication for the REST API and the async inference view."""

from __future__ import annotations

import datetime as dt
import logging

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Q
from django.utils import timezone
from rest_framework import authentication, exceptions

from apps.accounts.models import ApiToken
from apps.accounts.tokens import hash_token

logger = logging.getLogger(__name__)

# ``last_used`` is written at most this often per token, so an API client
# sending many requests costs one UPDATE a minute, not one per request.
LAST_USED_EVERY = dt.timedelta(minutes=1)


class TokenError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def bearer_token(header: str | None) -> str | None:
    """Return the token in an ``Authorization: Bearer <token>`` header, if any."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() not in {"bearer", "token"} or not value.strip():
        return None
    return value.strip()


def user_for_token(plain: str) -> tuple[AbstractBaseUser, ApiToken]:
    """Resolve a plain token to its active user.

    Costs one indexed query, and a conditional UPDATE of ``last_used`` when
    the stored time is over a minute old.
    """
    token = ApiToken.objects.select_related("user").filter(token_hash=hash_token(plain)).first()
    if token is None:
        if plain.startswith("node_"):
            raise TokenError("a node token authenticates only an agent's websocket; send an API token (`manage.py createtoken USER`)")
        raise TokenError("the API token is invalid; create one with `manage.py createtoken USER`")
    if not token.is_active():
        logger.info("rejected revoked or expired api token id=%s", token.pk)
        if token.revoked is not None:
            when, state = token.revoked, "was revoked"
        else:
            when, state = token.expires, "expired"
        raise TokenError(
            f"the API token {token.prefix}… {state} at {when:%Y-%m-%d %H:%M} UTC; "
            "create a new one with `manage.py createtoken USER`"
        )
    if not token.user.is_active:
        raise TokenError(f"the user of API token {token.prefix}… is inactive; ask an operator to reactivate the user")
    _touch(token)
    return token.user, token


def _touch(token: ApiToken) -> None:
    now = timezone.now()
    if token.last_used is not None and now - token.last_used < LAST_USED_EVERY:
        return
    # The condition repeats the check in SQL, so gateway processes racing on
    # the same token write once.
    stale = Q(last_used__isnull=True) | Q(last_used__lt=now - LAST_USED_EVERY)
    ApiToken.objects.filter(stale, pk=token.pk).update(last_used=now)
    token.last_used = now


class BearerTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        plain = bearer_token(request.META.get("HTTP_AUTHORIZATION"))
        if plain is None:
            return None
        try:
            return user_for_token(plain)
        except TokenError as exc:
            raise exceptions.AuthenticationFailed(exc.message) from None

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="grid"'
