"""Agent settings, from command-line options with GRID_* environment fallbacks."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

MIB = 1024 * 1024
GIB = 1024 * MIB

DEFAULT_CONCURRENCY = 2
DEFAULT_TORCH_THREADS = 1
DEFAULT_WS_MAX_BYTES = 64 * MIB
DEFAULT_MAX_MODEL_BYTES = 4 * GIB
DEFAULT_DATASET_RESCAN = 60
# bench/bench_batching.py ran 32 clients of DigitsCNN on 2 CPUs shared with
# other work. In four runs, a 1 ms window gave 2.2-3.0x the throughput of no
# batching, as much as 2 ms within the noise and more than 5 ms. It also added
# the least latency to a lone request, about 1.5 ms at p50. See
# bench/results/batching.md.
DEFAULT_BATCH_WINDOW_MS = 1
DEFAULT_MAX_BATCH_ROWS = 256
AGENT_PATH = "/ws/agent/"

# Frames this small could not carry a 1 MiB model chunk, the gateway's default.
MIN_WS_MAX_BYTES = 2 * MIB

_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}

# GRID_AGENT_FAULT values, test and benchmark knobs implemented in nodeagent.faults.
FAULT_WRONG_OUTPUTS = "wrong-outputs"
FAULT_CRASH_ON_INFER = "crash-on-infer"
AGENT_FAULTS = (FAULT_WRONG_OUTPUTS, FAULT_CRASH_ON_INFER)


class ConfigError(ValueError):
    """A missing or invalid setting. The message names the option and the variable."""


@dataclass(frozen=True)
class AgentConfig:
    endpoint: str
    token: str = field(repr=False)
    name: str
    data_dir: Path
    concurrency: int = DEFAULT_CONCURRENCY
    torch_threads: int = DEFAULT_TORCH_THREADS
    # Largest websocket message the agent accepts (websockets' max_size).
    ws_max_bytes: int = DEFAULT_WS_MAX_BYTES
    # Largest model file the agent accepts, and the limit on its unpacked size.
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    # Test and benchmark knob (GRID_AGENT_DELAY_MS): the worker sleeps this many
    # milliseconds before each inference, to simulate a slow node. Keep it 0 in
    # production.
    inference_delay_ms: int = 0
    # Further gateway endpoints, from a comma-separated --gateway. The agent
    # moves to the next one each time it reconnects; ``endpoint`` is the first.
    more_endpoints: tuple[str, ...] = ()
    # Seconds between rescans of <data-dir>/datasets/ (GRID_DATASET_RESCAN);
    # 0 rescans only at start and on SIGHUP.
    dataset_rescan: int = DEFAULT_DATASET_RESCAN
    # Milliseconds that a request waits for others to share its forward pass
    # (GRID_BATCH_WINDOW_MS); 0 turns batching off.
    batch_window_ms: int = DEFAULT_BATCH_WINDOW_MS
    # Maximum input rows in one batched forward pass (GRID_MAX_BATCH_ROWS).
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    # Test and benchmark knob (GRID_AGENT_FAULT): one of AGENT_FAULTS, or None
    # in production.
    fault: str | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.endpoint, *self.more_endpoints)


def agent_endpoint(url: str) -> str:
    """Return the agent websocket URL for a gateway URL.

    http becomes ws and https becomes wss. A path prefix is kept, so a gateway
    behind a proxy at https://host/grid is reached at wss://host/grid/ws/agent/.
    """
    parts = urlsplit(url.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ConfigError(
            f"invalid gateway URL {url!r}: expected http(s):// or ws(s):// and a host, "
            "for example https://grid.example.com"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"invalid gateway URL {url!r}: remove the query or fragment")
    if parts.username or parts.password:
        raise ConfigError(
            f"invalid gateway URL for host {parts.hostname!r}: remove the user name "
            "and password, and pass the node token in --token or GRID_NODE_TOKEN"
        )

    path = parts.path.rstrip("/")
    if not path.endswith(AGENT_PATH.rstrip("/")):
        path += AGENT_PATH.rstrip("/")
    return urlunsplit((scheme, parts.netloc, path + "/", "", ""))


def agent_endpoints(urls: str) -> tuple[str, ...]:
    """Return the agent websocket URL of each gateway in a comma-separated list.

    Duplicates are dropped, keeping the first. Raises ConfigError for an
    invalid URL or an empty list.
    """
    endpoints: list[str] = []
    for url in urls.split(","):
        if url.strip():
            endpoint = agent_endpoint(url)
            if endpoint not in endpoints:
                endpoints.append(endpoint)
    if not endpoints:
        raise ConfigError(f"invalid gateway list {urls!r}: expected one or more URLs separated by commas")
    return tuple(endpoints)


def _setting(
    value: str | None, environ: Mapping[str, str], variable: str
) -> str | None:
    if value is None:
        value = environ.get(variable)
    if value is not None:
        value = value.strip()
    return value or None


def _integer(value: str | None, *, label: str, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{label} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{label} must be at least {minimum}, got {number}")
    return number


def resolve_config(
    *,
    gateway: str | None = None,
    token: str | None = None,
    name: str | None = None,
    data_dir: str | None = None,
    concurrency: str | None = None,
    torch_threads: str | None = None,
    ws_max_bytes: str | None = None,
    max_model_bytes: str | None = None,
    batch_window_ms: str | None = None,
    max_batch_rows: str | None = None,
    environ: Mapping[str, str],
) -> AgentConfig:
    """Build the config from option values, falling back to GRID_* variables.

    Each argument is the command-line value, or None when the option was not
    given. Raises ConfigError naming the option and variable at fault.
    """
    gateway = _setting(gateway, environ, "GRID_GATEWAY")
    if gateway is None:
        raise ConfigError("missing gateway URL: pass --gateway or set GRID_GATEWAY")
    token = _setting(token, environ, "GRID_NODE_TOKEN")
    if token is None:
        raise ConfigError("missing node token: pass --token or set GRID_NODE_TOKEN")

    data = _setting(data_dir, environ, "GRID_DATA_DIR")
    delay_ms = _integer(
        _setting(None, environ, "GRID_AGENT_DELAY_MS"),
        label="GRID_AGENT_DELAY_MS",
        default=0,
        minimum=0,
    )
    fault = _setting(None, environ, "GRID_AGENT_FAULT")
    if fault is not None and fault not in AGENT_FAULTS:
        raise ConfigError(
            f"GRID_AGENT_FAULT must be one of {', '.join(AGENT_FAULTS)}, got {fault!r}; "
            "unset it outside tests"
        )
    endpoints = agent_endpoints(gateway)
    return AgentConfig(
        endpoint=endpoints[0],
        more_endpoints=endpoints[1:],
        token=token,
        name=_setting(name, environ, "GRID_NODE_NAME") or socket.gethostname(),
        data_dir=Path(data).expanduser() if data else Path.home() / ".grid-node",
        concurrency=_integer(
            _setting(concurrency, environ, "GRID_CONCURRENCY"),
            label="--concurrency / GRID_CONCURRENCY",
            default=DEFAULT_CONCURRENCY,
        ),
        torch_threads=_integer(
            _setting(torch_threads, environ, "GRID_TORCH_THREADS"),
            label="--torch-threads / GRID_TORCH_THREADS",
            default=DEFAULT_TORCH_THREADS,
        ),
        ws_max_bytes=_integer(
            _setting(ws_max_bytes, environ, "GRID_WS_MAX_BYTES"),
            label="--ws-max-bytes / GRID_WS_MAX_BYTES",
            default=DEFAULT_WS_MAX_BYTES,
            minimum=MIN_WS_MAX_BYTES,
        ),
        max_model_bytes=_integer(
            _setting(max_model_bytes, environ, "GRID_MAX_MODEL_BYTES"),
            label="--max-model-bytes / GRID_MAX_MODEL_BYTES",
            default=DEFAULT_MAX_MODEL_BYTES,
        ),
        inference_delay_ms=delay_ms,
        dataset_rescan=_integer(
            _setting(None, environ, "GRID_DATASET_RESCAN"),
            label="GRID_DATASET_RESCAN",
            default=DEFAULT_DATASET_RESCAN,
            minimum=0,
        ),
        batch_window_ms=_integer(
            _setting(batch_window_ms, environ, "GRID_BATCH_WINDOW_MS"),
            label="--batch-window-ms / GRID_BATCH_WINDOW_MS",
            default=DEFAULT_BATCH_WINDOW_MS,
            minimum=0,
        ),
        max_batch_rows=_integer(
            _setting(max_batch_rows, environ, "GRID_MAX_BATCH_ROWS"),
            label="--max-batch-rows / GRID_MAX_BATCH_ROWS",
            default=DEFAULT_MAX_BATCH_ROWS,
        ),
        fault=fault,
    )
