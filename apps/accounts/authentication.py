"""Bearer-token authentication for the REST API and the async inference view."""

from __future__ import annotations

import logging

from django.contrib.auth.models import AbstractBaseUser
from rest_framework import authentication, exceptions

from apps.accounts.models import ApiToken
from apps.accounts.tokens import hash_token

logger = logging.getLogger(__name__)


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
    """Resolve a plain token to its active user. Costs one indexed query."""
    token = ApiToken.objects.select_related("user").filter(token_hash=hash_token(plain)).first()
    if token is None:
        raise TokenError("the API token is invalid; create one with `manage.py createtoken USER`")
    if not token.is_active():
        logger.info("rejected revoked or expired api token id=%s", token.pk)
        raise TokenError("the API token is revoked or expired; create a new one")
    if not token.user.is_active:
        raise TokenError("the token's user is inactive")
    return token.user, token


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
