#!/usr/bin/env bash
# Run the test suite against PostgreSQL and Redis on their default local ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
