"""The Grid demo: real gateway, Celery and agent processes on loopback.

Trains a CNN on scikit-learn's digits, serves it with two replicas, runs
remote inference on the held-out test set, then SIGKILLs a node holding the
model while requests keep flowing, and reports what the client saw. Last, it
restarts that node and runs the model on the test-set shard each agent holds,
where the shard lives (demo/shards.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from gridsite.embedded import with_embedded
from gridsite.stack import ROOT, Stack, drop_database, ensure_database

console = Console()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument("--agents", type=int, default=3, help="node agents to start (at least 2)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs under var/demo")
    return parser.parse_args()


def build_env() -> dict[str, str]:
    # PostgreSQL and Redis on their default ports, else embedded ones under var/embedded.
    env = with_embedded(dict(os.environ), ROOT / "var" / "embedded", database="grid_demo")
    env.setdefault("GRID_CHANNEL_PREFIX", f"griddemo{os.getpid()}")
    env.setdefault("GRID_STAGING_DIR", str(ROOT / "var" / "demo" / "staging"))
    env["DJANGO_SETTINGS_MODULE"] = "gridsite.settings"
    env["PYTHONPATH"] = str(ROOT)
    return env


def main() -> int:
    args = parse_args()
    env = build_env()
    work = ROOT / "var" / "demo"
    shutil.rmtree(work, ignore_errors=True)
    stack = Stack(env=env, log_dir=work / "logs")
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return run(stack, work, args, stopping)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; stopping every process[/]")
        return 130
    except Exception as exc:
        console.print(f"[red]demo failed: {exc}[/]")
        console.print(f"process logs: {stack.log_dir}")
        return 1
    finally:
        stack.stop()
        if not args.keep_logs and not stopping.is_set():
            shutil.rmtree(work / "nodes", ignore_errors=True)


def run(stack: Stack, work: Path, args: argparse.Namespace, stopping: threading.Event) -> int:
    import torch

    import gridclient as gr
    from demo.digits import load_split, train
    from demo.shards import write_test_shards

    with console.status("preparing PostgreSQL"):
        if "GRID_DATABASE_URL" not in os.environ:
            # The demo's own database starts empty on every run.
            drop_database(stack.env["GRID_DATABASE_URL"])
        ensure_database(stack.env["GRID_DATABASE_URL"])
        stack.manage("migrate", "--no-input")
        token = stack.manage("createtoken", "demo", "--create-user", "--staff", "--name", "demo")
        node_tokens = {}
        for index in range(1, args.agents + 1):
            name = f"node-{index}"
            # --rotate issues a new token when an earlier run enrolled the node.
            node_tokens[name] = stack.manage("createnode", name, "--rotate")

    with console.status("starting the gateway, the Celery worker and beat, and the agents"):
        stack.start_gateway()
        stack.start_worker()
        write_test_shards(work / "nodes", list(node_tokens))
        for name, node_token in node_tokens.items():
            stack.start_agent(name, node_token, work / "nodes" / name)
        gateway = gr.GridNetwork(stack.url, token=token)
        _wait_for_nodes(gateway, args.agents)
    console.print(f"gateway at {stack.url} with {args.agents} agents online; logs in {stack.log_dir}")

    with console.status("training a CNN on scikit-learn's digits"):
        train_x, test_x, train_y, test_y = load_split()
        model = train(train_x, train_y)
        local_accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    console.print(f"trained: local test accuracy {local_accuracy:.3f} on {len(test_x)} held-out images")

    info = gateway.serve_model(
        model, "digits-cnn", allow_remote_inference=True, allow_download=False, replicas=2, example_inputs=train_x[:4]
    )
    holders = sorted(p.node_name for p in gateway.search_model("digits-cnn"))
    console.print(f"served digits-cnn ({info.size} bytes) on {', '.join(holders)}")

    # One request per image, so the latency figures are per request.
    latencies, correct = [], 0
    for image, label in zip(test_x, test_y, strict=True):
        started = time.perf_counter()
        logits = gateway.run_remote_inference(model_id="digits-cnn", dataset=image[None])
        latencies.append(time.perf_counter() - started)
        correct += int(logits.argmax(1).item() == label.item())
    accuracy = correct / len(test_x)
    console.print(
        f"remote inference: accuracy {accuracy:.3f}, latency p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms over {len(test_x)} requests"
    )

    # Classify the whole test set in one call, in chunks of 60 with 3 in flight, then again as an async job.
    started = time.perf_counter()
    batch_logits = gateway.run_remote_inference("digits-cnn", test_x, batch_size=60, concurrency=3, progress=False)
    batch_seconds = time.perf_counter() - started
    batch_accuracy = (batch_logits.argmax(1) == test_y).float().mean().item()
    started = time.perf_counter()
    job = gateway.run_remote_inference("digits-cnn", test_x, wait=False)
    job_logits = job.result(timeout=60)
    job_seconds = time.perf_counter() - started
    job_accuracy = (job_logits.argmax(1) == test_y).float().mean().item()
    console.print(
        f"batch: {len(test_x)} images in chunks of 60, 3 in flight, in {batch_seconds * 1000:.0f} ms, accuracy {batch_accuracy:.3f}; "
        f"async job {job.job_ids[0][:8]}: submitted and collected in {job_seconds * 1000:.0f} ms, accuracy {job_accuracy:.3f}"
    )

    with torch.inference_mode():
        local_predictions = model(test_x).argmax(1).tolist()
    failover = run_failover(stack, gateway, test_x, local_predictions, stopping)
    total, succeeded = failover["total"], failover["succeeded"]
    console.print(
        f"killed {failover['victim']} under load: {succeeded}/{total} requests succeeded, "
        f"slowest request {failover['slowest']:.2f} s, shown offline after {failover['offline_after']:.2f} s, "
        f"then served by {failover['next_node']}"
    )
    shards = run_datasets(stack, gateway, node_tokens, work)
    summary = f"accuracy {accuracy:.2f}, {succeeded}/{total} requests succeeded, failover {failover['slowest']:.1f} s"
    # "correct" counts answers equal to the local model's, so it checks the
    # remote path, not the model's accuracy.
    ok = accuracy >= 0.95 and succeeded == total and failover["correct"] == total
    ok = ok and shards["shards"] == args.agents and shards["accuracy"] >= 0.95
    console.print(("[green]" if ok else "[red]") + summary + "[/]")
    gateway.close()
    return 0 if ok else 1


def run_datasets(stack: Stack, gateway, node_tokens: dict[str, str], work: Path) -> dict:
    """Restart the killed node, then run the model on each test shard where it lives."""
    from demo.shards import TAGS, restart_offline_agents, run_on_shards

    with console.status("restarting the killed node"):
        restarted = restart_offline_agents(stack, gateway, node_tokens, work / "nodes")
    if restarted:
        console.print(f"restarted {', '.join(restarted)} with its data directory")
    console.print(f"data-local inference on the datasets tagged {' and '.join(TAGS)}; only class counts leave the nodes:")
    shards = run_on_shards(gateway, "digits-cnn", console)
    console.print(
        f"data-local accuracy {shards['accuracy']:.3f} ({shards['correct']}/{shards['rows']}) over {shards['shards']} shards"
    )
    return shards


def _wait_for_nodes(gateway, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = [n for n in gateway.connected_nodes() if n["status"] == "online"]
        if len(online) >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {len(online)} of {count} agents came online within {timeout} s")


def run_failover(stack: Stack, gateway, test_x, local_predictions: list[int], stopping: threading.Event) -> dict:
    """Send requests from 4 threads, SIGKILL a holder of the model mid-stream, count outcomes.

    A request is correct when the remote prediction equals the local model's.
    """
    victim = sorted(p.node_name for p in gateway.search_model("digits-cnn"))[0]
    results: list[tuple[float, float, bool, bool, str]] = []
    lock = threading.Lock()
    killed_at: list[float] = []

    def one(index: int) -> None:
        image, expected = test_x[index % len(test_x)], local_predictions[index % len(test_x)]
        started = time.monotonic()
        try:
            logits, meta = gateway.run_remote_inference_with_info(model_id="digits-cnn", dataset=image[None])
            row = (started, time.monotonic() - started, True, logits.argmax(1).item() == expected, meta.node)
        except Exception as exc:  # The demo counts failures; it does not stop on them.
            console.print(f"[red]request {index} failed: {exc}[/]")
            row = (started, time.monotonic() - started, False, False, "")
        with lock:
            results.append(row)

    total = 360
    offline_after: list[float] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for index in range(total):
            if stopping.is_set():
                break
            if index == total // 3:
                killed_at.append(time.monotonic())
                stack.kill(victim)
                watcher = threading.Thread(target=lambda: offline_after.append(_time_until_offline(gateway, victim, killed_at[0])))
                watcher.start()
            futures.append(pool.submit(one, index))
            time.sleep(0.004)
        for future in futures:
            future.result()
        watcher.join()
    after_kill = sorted((r for r in results if r[0] >= killed_at[0] and r[2]), key=lambda r: r[0])
    return {
        "victim": victim,
        "total": len(results),
        "succeeded": sum(1 for r in results if r[2]),
        "correct": sum(1 for r in results if r[3]),
        "slowest": max((r[1] for r in results), default=0.0),
        "offline_after": offline_after[0],
        "next_node": after_kill[0][4] if after_kill else "nobody",
    }


def _time_until_offline(gateway, name: str, since: float, timeout: float = 30.0) -> float:
    while time.monotonic() - since < timeout:
        status = {n["name"]: n["status"] for n in gateway.connected_nodes()}
        if status.get(name) == "offline":
            return time.monotonic() - since
        time.sleep(0.05)
    return float("inf")


if __name__ == "__main__":
    sys.exit(main())
