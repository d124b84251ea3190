# Shortcuts for the commands in README.md. `make up AGENTS=2` runs two local agents.
PYTHON ?= .venv/bin/python
AGENTS ?= 0
PORT ?= 8000

.PHONY: up setup test demo

up: setup
	$(PYTHON) -m gridsite.cli up --agents $(AGENTS) --port $(PORT)

setup:
	scripts/setup.sh

test:
	scripts/test.sh

demo:
	scripts/demo.sh
