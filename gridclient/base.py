"""Settings and state shared by GridNetwork and AsyncGridNetwork."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

from .core import make_core
from .operations import SignatureCache


class ClientBase:
    """Connection settings for one gateway.

    ``url`` and ``token`` default to the GRID_URL and GRID_TOKEN environment
    variables. ``timeout`` is the per-request limit in seconds for everything
    except inference, which uses its own timeout. ``retries`` is the number of
    extra attempts after a 429, a 503 or a connection failure. ``clock`` is the
    monotonic time source for serve_model's wait. It exists for tests, like the
    ``transport`` and ``sleep`` arguments of the subclasses.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._core = make_core(
            url, token, timeout=timeout, retries=retries, clock=clock
        )
        self._signatures = SignatureCache()

    @classmethod
    def from_env(cls, **options: Any) -> Self:
        """Create a client from GRID_URL and GRID_TOKEN, passing options on."""
        return cls(None, None, **options)

    @property
    def url(self) -> str:
        return self._core.url

    def __repr__(self) -> str:
        # The token is never shown, only whether one is set.
        token = "set" if self._core.has_token else "none"
        return f"{type(self).__name__}(url={self.url!r}, token={token})"
