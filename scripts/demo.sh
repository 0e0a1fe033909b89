#!/usr/bin/env bash
# The main job: build tiny checkpoints and repair the fine-tune with HCNR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
work=${HCNR_DEMO_DIR:-.hcnr/demo}
rm -rf "$work/repaired"
[ -f "$work/toy/data/task.jsonl" ] || .venv/bin/hcnr toy --out "$work/toy"
.venv/bin/hcnr repair \
  --base "$work/toy/base" \
  --finetuned "$work/toy/finetuned-adapter" \
  --honesty "$work/toy/data/honesty.jsonl" \
  --task "$work/toy/data/task.jsonl" \
  --out "$work/repaired"
echo "repaired checkpoint: $work/repaired (report: $work/repaired/hcnr_report.json)"
