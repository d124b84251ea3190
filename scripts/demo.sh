#!/usr/bin/env bash
# Run the demo: a gateway, a Celery worker and beat, and three node agents on
# loopback, serving a CNN trained on scikit-learn's handwritten digits.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m demo "$@"
