# Shortcuts for the commands in README.md. `make up AGENTS=2` runs two local agents.
PYTHON ?= .venv/bin/python
AGENTS ?= 0
PORT ?= 8000

.PHONY: up setup test demo bench

up: setup
	$(PYTHON) -m gridsite.cli up --agents $(AGENTS) --port $(PORT)

setup:
	scripts/setup.sh

test:
	scripts/test.sh

demo:
	scripts/demo.sh

# Every benchmark under bench/, then docs/benchmarks.md from their tables
# (about 20 minutes on 2 cores). PEER=1 also installs Ray Serve for bench_peer.py.
BENCH_SCRIPTS = overhead throughput peer failover heartbeat placement batching
PEER ?= 0

bench: setup
	$(PYTHON) -m pip install --quiet -r bench/requirements.txt
	if [ "$(PEER)" = "1" ]; then $(PYTHON) -m pip install --quiet -r bench/requirements-peer.txt; fi
	for name in $(BENCH_SCRIPTS); do $(PYTHON) bench/bench_$$name.py || exit 1; done
	$(PYTHON) bench/report.py
