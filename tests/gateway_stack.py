"""A gateway process alone on a fresh database, for API tests over real HTTP."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gridsite.stack import ROOT, Stack, drop_database, ensure_database


@contextmanager
def gateway_only(tmp: Path, **settings: str) -> Iterator[tuple[Stack, str]]:
    """Start a gateway with no worker and no agent; yield it and a staff token.

    The staff user is ``owner`` and the token has every scope. ``settings``
    are GRID_* variables for the gateway. Everything is stopped and the
    database dropped on exit.
    """
    suffix = uuid.uuid4().hex[:10]
    database_url = f"postgres://postgres@127.0.0.1:5432/grid_api_{suffix}"
    env = {
        **os.environ,
        "GRID_DATABASE_URL": database_url,
        "GRID_CHANNEL_PREFIX": f"gridapi{suffix}",
        "GRID_STAGING_DIR": str(tmp / "staging"),
        "DJANGO_SETTINGS_MODULE": "gridsite.settings",
        "PYTHONPATH": str(ROOT),
        **settings,
    }
    ensure_database(database_url)
    stack = Stack(env=env, log_dir=tmp / "logs")
    try:
        stack.manage("migrate", "--no-input")
        token = stack.manage("createtoken", "owner", "--create-user", "--staff")
        stack.start_gateway()
        yield stack, token
    finally:
        stack.stop()
        drop_database(database_url)
