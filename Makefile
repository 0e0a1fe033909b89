.PHONY: demo test test-all lint setup services

setup:
	bash scripts/bootstrap.sh

services:
	bash scripts/install-services.sh

demo:
	bash scripts/demo.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: setup services lint
	.venv/bin/python -m pytest

test-all: setup services lint
	.venv/bin/python -m pytest -m 'not gpu'
