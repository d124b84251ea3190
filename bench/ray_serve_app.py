"""Serve .pt2 programs with Ray Serve, as the peer that bench_peer.py compares with.

Run as its own process by bench_peer.py: it starts a local Ray cluster bound
to 127.0.0.1, deploys one application per ``--model ROUTE=PATH``, prints
``READY <port>`` once every application is running, and shuts Ray down on SIGTERM.
Each replica loads the program with torch.export.load, uses one torch thread
(as a Grid agent does by default), reads a safetensors body and returns
safetensors with the tensor ``output``, like Grid's inference endpoint.

    python bench/ray_serve_app.py --port 8765 --replicas 3 --model /sum=/tmp/sum.pt2
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

# Ray reports usage statistics to a remote server unless this is 0; the
# benchmarks send traffic only to loopback.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

logger = logging.getLogger(__name__)

SAFETENSORS = "application/vnd.safetensors"


@serve.deployment
class ProgramServer:
    """One replica: an exported program behind a safetensors-in, safetensors-out route."""

    def __init__(self, path: str) -> None:
        import torch

        torch.set_num_threads(1)
        program = torch.export.load(path)
        self.names = list(program.graph_signature.user_inputs)
        self.module = program.module()

    async def __call__(self, request: Request) -> Response:
        import safetensors.torch
        import torch

        inputs = safetensors.torch.load(await request.body())
        with torch.inference_mode():
            output = self.module(*(inputs[name] for name in self.names))
        return Response(
            safetensors.torch.save({"output": output}), media_type=SAFETENSORS
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--port", type=int, required=True, help="HTTP port of Serve's proxy"
    )
    parser.add_argument(
        "--replicas", type=int, default=3, help="replicas per model (default: 3)"
    )
    parser.add_argument(
        "--cpus", type=float, default=2.0, help="CPUs Ray may schedule (default: 2)"
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="ROUTE=PATH",
        help="route prefix and .pt2 path; repeat for several models",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        object_store_memory=256 * 1024**2,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for entry in args.model:
            route, _, path = entry.partition("=")
            name = route.strip("/") or "default"
            deployment = ProgramServer.options(
                num_replicas=args.replicas,
                ray_actor_options={
                    "num_cpus": args.cpus / (args.replicas * len(args.model) + 1)
                },
            )
            serve.run(deployment.bind(path), name=name, route_prefix=route)
        print(f"READY {args.port}", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
