"""The demo's data-local section: each agent holds a shard of the digits test set.

The shards are written into the agents' data directories before they start.
After the failover section, the demo finds them by tag, runs the model on each
shard on the node that holds it, and reports the accuracy that each node
computed. The images never leave their nodes; only class counts and accuracy do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from safetensors.torch import save_file

from demo.digits import load_split
from gridsite.stack import Stack

TAGS = ("digits", "test")


def write_test_shards(nodes_dir: Path, names: list[str]) -> None:
    """Split the held-out digits into one shard per node, with labels and a manifest."""
    _, test_x, _, test_y = load_split()
    for index, (name, rows) in enumerate(zip(names, np.array_split(np.arange(len(test_x)), len(names)), strict=True), start=1):
        folder = nodes_dir / name / "datasets"
        folder.mkdir(parents=True, exist_ok=True)
        dataset = f"digits-test-{index}"
        save_file({"images": test_x[rows].contiguous(), "labels": test_y[rows].contiguous()}, folder / f"{dataset}.safetensors")
        manifest = {
            "name": dataset,
            "tags": [*TAGS, f"shard-{index}"],
            "description": f"scikit-learn digits, held-out split, shard {index} of {len(names)}",
            "label_tensor": "labels",
        }
        (folder / f"{dataset}.json").write_text(json.dumps(manifest, indent=2))


def restart_offline_agents(stack: Stack, gateway: Any, node_tokens: dict[str, str], nodes_dir: Path, timeout: float = 60.0) -> list[str]:
    """Start again, with the same token and data, every agent the gateway shows offline."""
    offline = [node["name"] for node in gateway.connected_nodes() if node["status"] == "offline" and node["name"] in node_tokens]
    for name in offline:
        stack.start_agent(name, node_tokens[name], nodes_dir / name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(node["status"] == "online" for node in gateway.connected_nodes() if node["name"] in node_tokens):
            return offline
        time.sleep(0.2)
    raise RuntimeError(f"restarted agents {', '.join(offline)} did not come online within {timeout} s")


def run_on_shards(gateway: Any, model_id: str, console: Console) -> dict[str, Any]:
    """Run the model on every shard where it lives and print each node's accuracy."""
    shards = sorted(gateway.search(*TAGS), key=lambda ref: ref["name"])
    rows = correct = 0
    for ref in shards:
        holders = {p.node_name for p in gateway.search_model(model_id)}
        started = time.perf_counter()
        summary = gateway.run_remote_inference(model_id, dataset=ref, aggregate=True, timeout=120)
        elapsed = time.perf_counter() - started
        note = "" if ref["node_name"] in holders else ", after placing a replica there"
        console.print(
            f"  {ref['name']} on {ref['node_name']}: accuracy {summary['accuracy']:.3f} "
            f"({summary['correct']}/{summary['rows']}) in {elapsed:.2f} s{note}"
        )
        rows += summary["rows"]
        correct += summary["correct"]
    return {"shards": len(shards), "rows": rows, "correct": correct, "accuracy": correct / rows if rows else 0.0}
