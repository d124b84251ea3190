"""Request rate limits per API token, for the REST API and for inference.

GRID_THROTTLE_RATE limits REST requests and GRID_INFER_THROTTLE_RATE limits
inference requests, each counted per token in Redis (gridsite.ratelimit), so
every gateway process shares the count. A request over the limit gets a 429
with a Retry-After header.
"""

from __future__ import annotations

from django.conf import settings
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from apps.accounts.models import ApiToken
from gridsite import ratelimit
from gridsite.errors import ApiError


class TokenRateThrottle(BaseThrottle):
    """Count REST requests per API token, else per user, else per client IP.

    DRF runs throttles after authentication, so an anonymous request reaches
    this only on the views open to everyone, such as the schema.
    """

    scope = "api"

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Request, view) -> bool:
        rate = settings.GRID["THROTTLE_RATE"]
        if rate is None:
            return True
        self._wait = ratelimit.hit(self.scope, self.client_key(request), rate)
        return self._wait is None

    def client_key(self, request: Request) -> str:
        if isinstance(request.auth, ApiToken):
            return f"token:{request.auth.pk}"
        if request.user is not None and request.user.is_authenticated:
            return f"user:{request.user.pk}"
        return f"ip:{self.get_ident(request)}"

    def wait(self) -> float | None:
        return None if self._wait is None else ratelimit.retry_after(self._wait)


def check_infer_rate(token: ApiToken) -> None:
    """Count one inference request for the token; raise a 429 ApiError over the limit.

    Costs one Redis round trip, and nothing when GRID_INFER_THROTTLE_RATE is off.
    """
    rate = settings.GRID["INFER_THROTTLE_RATE"]
    if rate is None:
        return
    wait = ratelimit.hit("infer", f"token:{token.pk}", rate)
    if wait is None:
        return
    seconds = ratelimit.retry_after(wait)
    raise ApiError(
        429,
        "rate_limited",
        f"this API token sent more than {ratelimit.describe(rate)} of inference (GRID_INFER_THROTTLE_RATE); "
        f"retry after {seconds} s",
        headers={"Retry-After": str(seconds)},
    )
