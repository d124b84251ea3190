"""Production settings: `manage.py check --deploy` in a subprocess with production variables."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

from gridsite.stack import ROOT


def production_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRID_")}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "gridsite.settings",
            "PYTHONPATH": str(ROOT),
            "GRID_DEBUG": "0",
            "GRID_SECRET_KEY": secrets.token_urlsafe(50),
            "GRID_ALLOWED_HOSTS": "grid.example.com",
            "GRID_HTTPS": "1",
            "GRID_SECURE_HSTS_PRELOAD": "1",
            "GRID_SECURE_PROXY_SSL_HEADER": "1",
            **extra,
        }
    )
    return env


def check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deploy_check_clean():
    result = check_deploy(production_env())

    assert result.returncode == 0, result.stderr[-3000:]


def test_secret_key_from_file(tmp_path):
    key_file = tmp_path / "secret_key"
    key_file.write_text(secrets.token_urlsafe(50) + "\n")
    env = production_env(GRID_SECRET_KEY_FILE=str(key_file))
    del env["GRID_SECRET_KEY"]

    result = check_deploy(env)

    assert result.returncode == 0, result.stderr[-3000:]


def test_deploy_check_flags_plain_http():
    result = check_deploy(production_env(GRID_HTTPS="0", GRID_SECURE_HSTS_PRELOAD="0"))

    assert result.returncode == 1
    assert "security.W008" in result.stderr
    assert "security.W004" in result.stderr


def test_deploy_check_flags_default_key():
    env = production_env()
    del env["GRID_SECRET_KEY"]

    result = check_deploy(env)

    assert result.returncode == 1
    assert "security.W009" in result.stderr
