#!/usr/bin/env bash
# Idempotent environment set-up: a virtualenv in .venv with the project installed.
# torch is pinned first so that the range in pyproject.toml (torch>=2.4) is already
# satisfied and pip does not pull a different (multi-GB) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${HCNR_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "$TORCH_SPEC"
fi
# Re-install only when the dependency list changed since the last successful install.
stamp=.venv/.hcnr-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
  .venv/bin/pip install --quiet -e ".[dev,test]"
  cp pyproject.toml "$stamp"
fi
