# Developer entry points; scripts/ holds the logic so CI runs the same thing.
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/etcdisco demo

test:
	bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
