#!/usr/bin/env bash
# The main job: set up .venv, then repair the model organism through the real service
# (scripts/demo.py). HCNR_DEMO_DIR picks the work directory (default .hcnr/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py
