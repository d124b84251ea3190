"""The ``grid`` command. ``grid up`` runs a whole Grid on one machine.

``grid up`` applies migrations, then runs the gateway, the Celery worker and
beat, and optionally local agents as one supervised group (honcho), each
process's output prefixed with its name. Ctrl-C or SIGTERM stops them all;
when one process exits, the others are stopped too. Without
GRID_DATABASE_URL and GRID_REDIS_URL, and with nothing on the default ports,
PostgreSQL and Redis run embedded in the data directory (gridsite.embedded).

``grid manage ARGS`` runs ``manage.py ARGS`` against the same services, for
example ``grid manage createtoken alice --create-user --staff``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / "var"

console = Console(stderr=True, highlight=False, soft_wrap=True)


class UpError(Exception):
    """A step before the processes start failed. The message names the step and the cause."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grid", description="Run Grid on this machine.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser(
        "up",
        help="run the gateway, Celery worker and beat, and local agents",
        description="Apply migrations, then run the gateway, the Celery worker and beat, and "
        "--agents local agents until Ctrl-C or SIGTERM.",
    )
    up.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default: 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="gateway port (default: 8000)")
    up.add_argument("--agents", type=_count, default=0, help="local agents to run, enrolled as nodes local-1..N (default: 0)")
    _data_dir_option(up)

    manage = commands.add_parser(
        "manage",
        help="run a manage.py command against the same services as grid up",
        description="Run manage.py with the database and Redis that grid up uses.",
    )
    _data_dir_option(manage)
    manage.add_argument("args", nargs=argparse.REMAINDER, help="the manage.py command and its arguments")
    return parser


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("GRID_VAR_DIR", DEFAULT_DATA_DIR)),
        help="directory for embedded services, staging and agent data (GRID_VAR_DIR; default: var/ in the repository)",
    )


def _count(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 64:
        raise argparse.ArgumentTypeError(f"--agents must be between 0 and 64, got {number}")
    return number


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM before the supervisor starts must still run the exit handlers
    # that stop embedded servers.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.command == "up":
            return up(args)
        return manage(args)
    except UpError as exc:
        console.print(f"[red]grid {args.command}: {exc}[/]")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def prepare_env(data_dir: Path):
    """Return the resolved services for processes started from ``data_dir``."""
    from gridsite.embedded import EmbeddedError, resolve_services

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "gridsite.settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("GRID_STAGING_DIR", str(data_dir / "staging"))
    try:
        return resolve_services(env, data_dir / "embedded")
    except EmbeddedError as exc:
        raise UpError(str(exc)) from None


def run_manage(env: dict[str, str], *args: str) -> str:
    """Run a manage.py command; return its output or raise UpError with its error output."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise UpError(f"manage.py {args[0]} failed:\n{result.stderr.strip()[-3000:]}")
    return result.stdout.strip()


def manage(args: argparse.Namespace) -> int:
    services = prepare_env(args.data_dir.resolve())
    command = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not command:
        raise UpError("name a manage.py command, for example: grid manage createtoken alice --create-user")
    return subprocess.run([sys.executable, str(ROOT / "manage.py"), *command], env=services.env, cwd=ROOT).returncode


def up(args: argparse.Namespace) -> int:
    from honcho.manager import Manager

    from gridsite.stack import celery_commands, ensure_database, gateway_command

    data_dir = args.data_dir.resolve()
    services = prepare_env(data_dir)
    env = services.env
    for note in services.notes:
        console.print(note)
    try:
        if services.postgres is None:
            try:
                ensure_database(env["GRID_DATABASE_URL"])
            except Exception as exc:
                raise UpError(f"cannot reach or create the database: {exc}") from None
        with console.status("applying migrations"):
            run_manage(env, "migrate", "--no-input")
        tokens = {f"local-{i}": run_manage(env, "createnode", f"local-{i}", "--rotate") for i in range(1, args.agents + 1)}

        manager = Manager()
        manager.add_process("gateway", _shell(gateway_command(args.port, env, host=args.host)), env=env, cwd=str(ROOT))
        data_dir.mkdir(parents=True, exist_ok=True)
        for name, command in celery_commands(data_dir / "celerybeat-schedule").items():
            manager.add_process(name, _shell(command), env=env, cwd=str(ROOT))
        url = f"http://{'127.0.0.1' if args.host in {'0.0.0.0', '::'} else args.host}:{args.port}"
        for name, token in tokens.items():
            agent = [sys.executable, "-m", "nodeagent", "--gateway", url, "--name", name, "--data-dir", str(data_dir / "nodes" / name)]
            manager.add_process(name, _shell(agent), env={**env, "GRID_NODE_TOKEN": token}, cwd=str(ROOT))

        _print_banner(url, args, services.embedded)
        manager.loop()
        return manager.returncode or 0
    finally:
        services.stop()


def _shell(command: list[str]) -> str:
    # honcho runs each command through a shell; exec makes the process itself
    # receive honcho's SIGTERM.
    return "exec " + shlex.join(command)


def _print_banner(url: str, args: argparse.Namespace, embedded: bool) -> None:
    data_dir = "" if args.data_dir.resolve() == DEFAULT_DATA_DIR else f" --data-dir {shlex.quote(str(args.data_dir))}"
    console.print(f"[bold]Grid gateway at {url}[/]  (health {url}/healthz, readiness {url}/readyz, metrics {url}/metrics)")
    console.print(f"API token: run [bold]grid manage{data_dir} createtoken NAME --create-user --staff[/] in another terminal; it prints the token once.")
    if embedded:
        console.print("The embedded PostgreSQL and Redis stop with this command; their data stays in the data directory.")
    console.print("Ctrl-C stops every process.")


if __name__ == "__main__":
    sys.exit(main())
