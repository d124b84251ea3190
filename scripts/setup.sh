#!/usr/bin/env bash
# Create .venv from the pinned requirements, or bring an existing one up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    echo "Creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt pyproject.toml gridclient/pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
    echo "Installing the pinned requirements into .venv (torch alone is about 200 MB)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    .venv/bin/python -m pip install --quiet --no-deps -e .
    .venv/bin/python -m pip install --quiet --no-deps -e ./gridclient
    echo "$wanted" > "$stamp"
fi
