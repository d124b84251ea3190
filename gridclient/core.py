"""HTTP logic shared by the sync and async clients.

Each client operation is a generator that yields three kinds of effect and
returns its result. The runner sends the request of a ``Send`` and resumes the
generator with the response, it waits out a ``Sleep``, and it runs the flows of
a ``Gather`` concurrently and resumes the generator with their results in
order. GridNetwork runs the generators with httpx.Client, time.sleep and a
thread pool, and AsyncGridNetwork with httpx.AsyncClient, asyncio.sleep and
tasks, so request building, retries, error mapping and polling are written once.

The runner throws an httpx.TransportError into the generator at the ``yield``
of the ``Send`` that failed, and the first exception of a gathered flow at the
``yield`` of its ``Gather``.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from .exceptions import GridConnectionError, GridError, error_from_response

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Statuses that mean the gateway did not process the request, so any request,
# including an inference POST, may be sent again.
RETRY_STATUSES = frozenset({429, 503})

# Errors raised before any byte of the request left the client. Other transport
# errors are retried only for idempotent requests.
UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)

USER_AGENT = "gridclient/0.1.0"


@dataclass(frozen=True)
class Send:
    request: httpx.Request


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Gather:
    """Run flows concurrently and resume with their results, in the flows' order.

    At most ``limit`` flows run at once, and the runner takes each flow from
    ``flows`` only when a slot is free, so a lazy iterable keeps at most
    ``limit`` flows alive. ``on_result(index, result)`` is called as each flow
    finishes, in any order, from the thread or task that yielded the Gather.
    After the first flow fails, no further flow starts and the runner raises
    that flow's exception once the flows already running have ended.
    """

    flows: Iterable[Generator[Any, Any, Any]]
    limit: int
    on_result: Callable[[int, Any], None] | None = None


Effect = Send | Sleep | Gather
Flow = Generator[Effect, Any, T]


def gather(
    flows: list[Flow[T]],
    limit: int,
    on_result: Callable[[int, Any], None] | None = None,
) -> Flow[list[T]]:
    """Run flows through a Gather effect and return their results in order.

    No flow or a single flow runs inline, which saves the runner a thread
    pool or a task for the common case of a request that needs no splitting.
    """
    if limit < 1:
        raise ValueError(f"concurrency must be at least 1, got {limit}")
    if not flows:
        return []
    if len(flows) > 1:
        return (yield Gather(flows, limit, on_result))
    result = yield from flows[0]
    if on_result is not None:
        on_result(0, result)
    return [result]


def model_path(model_id: str, suffix: str = "") -> str:
    return f"/api/models/{quote(model_id, safe='')}/{suffix}"


class Core:
    """Connection settings, request building and the retry policy.

    ``retries`` is the number of extra attempts after the first. Delays grow as
    ``backoff * 2**retry`` seconds unless the response has a Retry-After header,
    which is used as given. A Retry-After over ``max_delay`` seconds is not
    waited for: the error is raised at once so the caller can decide.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float,
        retries: int,
        clock: Callable[[], float],
        backoff: float = 0.5,
        max_delay: float = 60.0,
    ) -> None:
        self.url = normalize_url(url)
        self._token = token
        self.timeout = timeout
        self.retries = retries
        self.clock = clock
        self.backoff = backoff
        self.max_delay = max_delay

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def build_request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        stream: httpx.SyncByteStream | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Request:
        """Build a request to the gateway with the auth and timeout set.

        With ``stream``, the caller must put Content-Length and Content-Type in
        ``headers``, because httpx adds no content headers to a streamed body.
        """
        url = httpx.URL(self.url + path)
        if params is not None:
            # Passing params=None to httpx.URL would drop a query in path.
            url = url.copy_merge_params(params)
        all_headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self._token:
            all_headers["Authorization"] = f"Bearer {self._token}"
        if stream is not None:
            all_headers["Host"] = url.netloc.decode("ascii")
        all_headers.update(headers or {})

        limit = httpx.Timeout(self.timeout if timeout is None else timeout)
        return httpx.Request(
            method,
            url,
            content=content,
            stream=stream,
            headers=all_headers,
            extensions={"timeout": limit.as_dict()},
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        retries: int | None = None,
        **options: Any,
    ) -> Flow[httpx.Response]:
        """Send a request with retries and return its 2xx response.

        Retries on 429 and 503 for every request, on connection failures for
        every request, and on other transport errors (such as a read timeout)
        only when ``idempotent``. ``retries`` overrides the client's number of
        extra attempts for this request. Raises the GridError subclass for the
        status, or GridConnectionError when the gateway cannot be reached.
        """
        max_retries = self.retries if retries is None else retries
        retry = 0
        while True:
            request = self.build_request(method, path, **options)
            try:
                response: httpx.Response = yield Send(request)
            except httpx.TransportError as exc:
                may_retry = idempotent or isinstance(exc, UNSENT_ERRORS)
                if not may_retry or retry >= max_retries:
                    raise self._connection_error(exc) from exc
                delay = self.backoff * 2**retry
                logger.warning(
                    "Retrying %s %s in %.1fs after %s (retry %d of %d)",
                    method,
                    path,
                    delay,
                    type(exc).__name__,
                    retry + 1,
                    max_retries,
                )
                yield Sleep(delay)
                retry += 1
                continue

            if response.is_success:
                return response
            error = error_from_response(response.status_code, response.content)
            if response.status_code not in RETRY_STATUSES or retry >= max_retries:
                raise error

            delay = self._retry_delay(response, retry)
            if delay is None:
                logger.warning(
                    "Not retrying %s %s: HTTP %d asks to wait %s seconds, over %.0fs",
                    method,
                    path,
                    response.status_code,
                    response.headers.get("Retry-After"),
                    self.max_delay,
                )
                raise error
            logger.warning(
                "Retrying %s %s in %.1fs after HTTP %d %s (retry %d of %d)",
                method,
                path,
                delay,
                response.status_code,
                error.code,
                retry + 1,
                max_retries,
            )
            yield Sleep(delay)
            retry += 1

    def get_json(self, path: str, params: dict[str, str] | None = None) -> Flow[Any]:
        response = yield from self.request("GET", path, idempotent=True, params=params)
        return parse_json(response)

    def list_results(
        self, path: str, params: dict[str, str] | None = None
    ) -> Flow[list[Any]]:
        """Fetch a ``{"count", "results"}`` listing and any ``next`` pages.

        A ``next`` link to another origin is not followed, so the token is only
        ever sent to the configured gateway. A link already followed ends the
        listing, so a looping gateway cannot hang the client.
        """
        data = yield from self.get_json(path, params)
        results = list(_results(data, path))
        next_url = data.get("next")
        seen: set[str] = set()
        while next_url:
            if next_url in seen:
                logger.warning("Not following next page %s of %s again", next_url, path)
                break
            seen.add(next_url)
            if not str(next_url).startswith(self.url + "/"):
                logger.warning(
                    "Not following next page %s of %s: it is not on %s",
                    next_url,
                    path,
                    self.url,
                )
                break
            next_path = str(next_url)[len(self.url) :]
            data = yield from self.get_json(next_path)
            results.extend(_results(data, next_path))
            next_url = data.get("next")
        return results

    def _retry_delay(self, response: httpx.Response, retry: int) -> float | None:
        header = response.headers.get("Retry-After")
        if header is None:
            return self.backoff * 2**retry
        delay = parse_retry_after(header)
        if delay is None:
            return self.backoff * 2**retry
        if delay > self.max_delay:
            return None
        return delay

    def _connection_error(self, exc: httpx.TransportError) -> GridConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return GridConnectionError(
                f"no response from the Grid gateway at {self.url} in time "
                f"({type(exc).__name__}); raise timeout= or check the gateway",
                code="timeout",
            )
        return GridConnectionError(
            f"could not reach the Grid gateway at {self.url} "
            f"({type(exc).__name__}: {exc}); check the URL and that the gateway runs",
            code="connection_failed",
        )


def _results(data: Any, path: str) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise GridError(
            f"GET {path} returned no 'results' list", code="unexpected_response"
        )
    return data["results"]


def parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        excerpt = response.content[:200].decode("utf-8", errors="replace")
        raise GridError(
            f"{response.request.method} {response.request.url.path} returned "
            f"HTTP {response.status_code} with a body that is not JSON: {excerpt!r}",
            status=response.status_code,
            code="unexpected_response",
        ) from None


def parse_retry_after(value: str) -> float | None:
    """Return the wait in seconds from a Retry-After header, or None if invalid.

    The header is either a number of seconds or an HTTP date (RFC 9110, 10.2.3).
    """
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def normalize_url(url: str) -> str:
    """Return the gateway URL without a trailing slash, or raise ValueError."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(
            f"invalid Grid gateway URL {url!r}: use http:// or https:// and a host, "
            "for example https://grid.example.org"
        )
    return str(url).rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_settings(url: str | None, token: str | None) -> tuple[str, str | None]:
    """Fill the URL and token from GRID_URL and GRID_TOKEN when not given."""
    url = url or os.environ.get("GRID_URL")
    if not url:
        raise ValueError(
            "no Grid gateway URL: pass url= or set the GRID_URL environment variable"
        )
    token = token or os.environ.get("GRID_TOKEN") or None
    return url, token


def make_core(
    url: str | None,
    token: str | None,
    *,
    timeout: float,
    retries: int,
    clock: Callable[[], float] | None,
) -> Core:
    url, token = resolve_settings(url, token)
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    core = Core(
        url, token, timeout=timeout, retries=retries, clock=clock or time.monotonic
    )
    host = httpx.URL(core.url).host
    if token and httpx.URL(core.url).scheme == "http" and not is_loopback(host):
        logger.warning(
            "Sending the Grid token unencrypted to %s; "
            "use https:// for remote gateways",
            core.url,
        )
    return core
