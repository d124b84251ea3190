"""Scope and staff checks for the REST API and the plain async views.

An API token carries scopes that limit what it may do on its user's behalf:

- ``read``: every GET, HEAD and OPTIONS request;
- ``serve``: uploading, changing and deleting models;
- ``infer``: running inference;
- ``admin``: managing nodes, which also needs a staff user.

A request authenticated by a session (the dashboard) has no token, so scopes
do not limit it; the user's own permissions still do.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.http import HttpRequest
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from apps.accounts.authentication import TokenError, bearer_token, user_for_token
from apps.accounts.models import ApiToken
from gridsite.errors import ApiError

READ = ApiToken.Scope.READ.value
INFER = ApiToken.Scope.INFER.value
SERVE = ApiToken.Scope.SERVE.value
ADMIN = ApiToken.Scope.ADMIN.value


def require_scope(token: ApiToken | None, scope: str) -> None:
    """Raise a 403 ApiError unless the token has ``scope``; None passes."""
    if token is None or scope in token.scopes:
        return
    granted = ", ".join(token.scopes) or "none"
    raise ApiError(
        403,
        "missing_scope",
        f"this API token ({token.prefix}…) lacks the {scope!r} scope (it has: {granted}); "
        f"create a token with it: manage.py createtoken USER --scopes {scope},...",
    )


def authenticate_bearer(request: HttpRequest, scope: str) -> tuple[AbstractBaseUser, ApiToken]:
    """Return the user and token of a plain view's request that has ``scope``.

    For the async views outside DRF. Raises a 401 ApiError for a missing,
    invalid, revoked or expired token and a 403 for a missing scope. Costs one
    indexed query.
    """
    challenge = {"WWW-Authenticate": 'Bearer realm="grid"'}
    plain = bearer_token(request.headers.get("Authorization"))
    if plain is None:
        raise ApiError(401, "unauthenticated", "send an API token in the header 'Authorization: Bearer <token>'", headers=challenge)
    try:
        user, token = user_for_token(plain)
    except TokenError as exc:
        raise ApiError(401, "unauthenticated", exc.message, headers=challenge) from None
    require_scope(token, scope)
    return user, token


class TokenScope(BasePermission):
    """Require the token scope that the request's method needs on this view.

    Safe methods need ``read``. Other methods need the view's ``write_scope``,
    which is ``admin`` when the view does not set one, so a new endpoint is
    closed to narrow tokens until it sets ``write_scope``.
    """

    def has_permission(self, request: Request, view) -> bool:
        token = request.auth if isinstance(request.auth, ApiToken) else None
        scope = (
            READ
            if request.method in SAFE_METHODS
            else getattr(view, "write_scope", ADMIN)
        )
        require_scope(token, scope)
        return True


class IsStaff(BasePermission):
    """Allow only staff users; others get 403 with ``message``."""

    message = "only staff users can manage nodes; send the API token of a staff user"

    def has_permission(self, request: Request, view) -> bool:
        return bool(request.user and request.user.is_staff)
