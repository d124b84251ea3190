"""The ``grid-node`` command, which runs a node agent until it is stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from gridproto.logformat import make_formatter
from nodeagent import __version__
from nodeagent.config import (
    AGENT_FAULTS,
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_ROWS,
    AgentConfig,
    ConfigError,
    resolve_config,
)

if TYPE_CHECKING:
    from nodeagent.connection import Agent

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TOKEN_REJECTED = 3

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_EPILOG = f"""\
Each option falls back to the environment variable named in its help.

exit codes:
  {EXIT_OK}  stopped by SIGTERM or SIGINT, or disconnected by the gateway
  {EXIT_ERROR}  unexpected error, such as an unusable data directory
  {EXIT_USAGE}  missing or invalid option
  {EXIT_TOKEN_REJECTED}  the gateway rejected the node token (HTTP 403)

GRID_LOG_FORMAT=json writes one JSON object per log line.

Datasets in <data-dir>/datasets/ are rescanned at start, on SIGHUP and every
GRID_DATASET_RESCAN seconds (default: 60; 0 rescans only at start and on SIGHUP).

GRID_AGENT_DELAY_MS, for tests and benchmarks only, makes each inference wait
that many milliseconds first, to simulate a slow node. A batched forward pass
waits once.

GRID_AGENT_FAULT, for tests and benchmarks only, is unset by default:
  wrong-outputs   add 1.0 to every floating-point output, to simulate a lying
                  or broken node
  crash-on-infer  exit with status 1 as soon as an infer.request arrives, to
                  simulate a crash mid-inference
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grid-node",
        description="Run a Grid node agent: connect to a gateway, hold models and "
        "run inference requests.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"grid-node {__version__}"
    )
    parser.add_argument(
        "--gateway",
        help="gateway URL, http(s):// or ws(s)://, or several separated by commas: "
        "the agent tries the next one each time it reconnects (GRID_GATEWAY)",
    )
    parser.add_argument(
        "--token",
        help="node token (GRID_NODE_TOKEN). Prefer the variable, because other "
        "users of the machine can read command-line arguments",
    )
    parser.add_argument(
        "--name",
        help="node name shown by the gateway (GRID_NODE_NAME; default: host name)",
    )
    parser.add_argument(
        "--data-dir",
        help="directory for model files and datasets "
        "(GRID_DATA_DIR; default: ~/.grid-node)",
    )

    parser.add_argument(
        "--concurrency",
        help="maximum inference requests running at once "
        "(GRID_CONCURRENCY; default: 2)",
    )
    parser.add_argument(
        "--torch-threads",
        help="threads torch uses within one request (GRID_TORCH_THREADS; default: 1)",
    )
    parser.add_argument(
        "--ws-max-bytes",
        help="maximum websocket message size in bytes, which should match the "
        "gateway's (GRID_WS_MAX_BYTES; default: 67108864, 64 MiB)",
    )
    parser.add_argument(
        "--max-model-bytes",
        help="maximum model file size and unpacked archive size in bytes "
        "(GRID_MAX_MODEL_BYTES; default: 4294967296, 4 GiB)",
    )
    parser.add_argument(
        "--batch-window-ms",
        help="milliseconds that an inference request waits for other requests to "
        "the same model with the same input shapes apart from dim 0, to run them "
        "as one forward pass; 0 turns batching off "
        f"(GRID_BATCH_WINDOW_MS; default: {DEFAULT_BATCH_WINDOW_MS})",
    )
    parser.add_argument(
        "--max-batch-rows",
        help="maximum input rows (dim 0) in one batched forward pass "
        f"(GRID_MAX_BATCH_ROWS; default: {DEFAULT_MAX_BATCH_ROWS})",
    )

    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=os.environ.get("GRID_LOG_LEVEL", "INFO").upper(),
        help="log level (GRID_LOG_LEVEL; default: INFO)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:  # a bad GRID_LOG_LEVEL bypasses choices
        parser.print_usage(sys.stderr)
        print(
            f"grid-node: error: GRID_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, "
            f"got {args.log_level!r}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        config = resolve_config(
            gateway=args.gateway,
            token=args.token,
            name=args.name,
            data_dir=args.data_dir,
            concurrency=args.concurrency,
            torch_threads=args.torch_threads,
            ws_max_bytes=args.ws_max_bytes,
            max_model_bytes=args.max_model_bytes,
            batch_window_ms=args.batch_window_ms,
            max_batch_rows=args.max_batch_rows,
            environ=os.environ,
        )
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"grid-node: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    try:
        formatter = make_formatter(os.environ, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"grid-node: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=args.log_level, handlers=[handler])
    return run(config)


def run(config: AgentConfig) -> int:
    # torch takes seconds to import, and --help or an option error does not need it.
    import torch

    from nodeagent.connection import Agent, TokenRejected

    torch.set_num_threads(config.torch_threads)
    logger.info(
        "starting grid-node %s as %r: gateway %s, data in %s, concurrency %d, "
        "torch threads %d",
        __version__,
        config.name,
        ", ".join(config.endpoints),
        config.data_dir,
        config.concurrency,
        config.torch_threads,
    )
    if config.batch_window_ms:
        logger.info(
            "batching requests within %d ms, up to %d rows per forward pass",
            config.batch_window_ms,
            config.max_batch_rows,
        )
    else:
        logger.info("batching is off (GRID_BATCH_WINDOW_MS=0)")
    if config.fault:
        logger.warning(
            "GRID_AGENT_FAULT=%s is set: this node misbehaves on purpose (one of %s)",
            config.fault,
            ", ".join(AGENT_FAULTS),
        )
    if config.inference_delay_ms:
        logger.warning(
            "GRID_AGENT_DELAY_MS is set: each inference waits %d ms first",
            config.inference_delay_ms,
        )

    async def serve() -> str:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _request_stop, agent, signum)
        loop.add_signal_handler(signal.SIGHUP, _request_rescan, agent)
        outcome = await agent.run()
        return outcome.value

    try:
        outcome = asyncio.run(serve())
    except TokenRejected as exc:
        logger.error("%s", exc)
        return EXIT_TOKEN_REJECTED
    except OSError as exc:
        logger.error("grid-node cannot run: %s", exc)
        return EXIT_ERROR
    logger.info("grid-node stopped: %s", outcome)
    return EXIT_OK


def _request_rescan(agent: Agent) -> None:
    logger.info("received SIGHUP, rescanning datasets")
    agent.datasets.request_rescan()


def _request_stop(agent: Agent, signum: int) -> None:
    logger.info("received %s, stopping", signal.Signals(signum).name)
    agent.stop()
