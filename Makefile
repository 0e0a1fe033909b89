.PHONY: demo test lint setup

setup:
	bash scripts/bootstrap.sh

demo:
	bash scripts/demo.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: setup lint
	.venv/bin/python -m pytest
