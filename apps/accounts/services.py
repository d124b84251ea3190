"""Changes to API tokens made by operators."""

from __future__ import annotations

import logging

from django.db.models import QuerySet
from django.utils import timezone

from apps.accounts.models import ApiToken

logger = logging.getLogger(__name__)


def revoke_tokens(*, tokens: QuerySet[ApiToken], actor: str) -> list[ApiToken]:
    """Revoke the tokens that are not revoked yet; return those revoked now.

    A revoked token is rejected on its next request. The rows stay, so
    listings still show who held the token and when it was last used.
    """
    now = timezone.now()
    pending = list(tokens.filter(revoked__isnull=True).select_related("user"))
    ApiToken.objects.filter(
        pk__in=[t.pk for t in pending], revoked__isnull=True
    ).update(revoked=now)
    for token in pending:
        token.revoked = now
        logger.info(
            "api token id=%s (%s…) of user %s revoked by %s",
            token.pk,
            token.prefix,
            token.user_id,
            actor,
        )
    return pending


def token_state(token: ApiToken) -> str:
    """Return ``active``, ``expired`` or ``revoked``."""
    if token.revoked is not None:
        return "revoked"
    if token.expires is not None and token.expires <= timezone.now():
        return "expired"
    return "active"
