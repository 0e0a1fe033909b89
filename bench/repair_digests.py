"""sha256 of the checkpoint a repair publishes, for a grid of settings on the organism: run
before and after a refactor of the pipeline and diff the output (it must not change).

    .venv/bin/python -m bench.repair_digests > before.txt    # at the old commit
    .venv/bin/python -m bench.repair_digests > after.txt     # at the new one
    diff before.txt after.txt
    .venv/bin/python -m bench.repair_digests --check bench/results/repair_digests.txt

`--check` compares with the committed digests (exit 1 on any difference). They hold for the
organism on their first line: its build key (the recipe version) and the digest of its
weights (what the libraries and CPU that built it made of the recipe; a fresh environment
may resolve other library versions and build other bits). On another build, run the old
commit instead.

Covers whole-model and layer-by-layer runs, every compensation and calibration, on the
organism's full fine-tune and its LoRA adapter (12 repairs, ~4 min on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from hcnr_core import RepairConfig
from hcnr_core.config import RunOptions, split_run_options
from hcnr_core.organism import build_organism
from hcnr_core.pipeline import RepairPipeline
from hcnr_core.realmodels import cache_root

SETTINGS = [
    {},
    {"compensation": "task_aware", "task_weight": 3},
    {"layerwise": True},
    {"hessian_inputs": "asymmetric", "compensation": "task_aware", "r_cw": 1.0},
    {"hessian_inputs": "sequential", "layerwise": True},
    {"compensation": "exact", "r_cw": 0.5},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, help="digests to compare with (exit 1 if any differ)")
    args = parser.parse_args()
    organism = build_organism(cache_root() / "organism" / "tiny-0", size="tiny", seed=0)
    root = organism["root"]
    key = json.loads(organism["manifest"].read_text())["key"]
    # The build key names the recipe; the weights' digest what this machine's libraries and
    # CPU made of it (a fresh environment may resolve other versions and build other bits).
    weights = hashlib.sha256()
    for shard in sorted(root.glob("*/*.safetensors")):
        weights.update(shard.read_bytes())
    rows = [f"organism {key[:16]} weights {weights.hexdigest()[:16]}"]
    print(rows[0], flush=True)
    data = [root / "data/honesty.jsonl", root / "data/task.jsonl"]
    for finetuned in ("finetuned", "finetuned-adapter"):
        for overrides in SETTINGS:
            spec, options = split_run_options(overrides)  # layerwise: how, not what
            pipeline = RepairPipeline(RepairConfig(**spec), RunOptions(**options))
            prepared = pipeline.prepare(root / "base", root / finetuned, *data)
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch) / "out"
                report = pipeline.run(prepared, out)
                digest = hashlib.sha256()
                for shard in sorted(out.glob("*.safetensors")):
                    digest.update(shard.read_bytes())
            row = [finetuned, json.dumps(overrides), digest.hexdigest()[:16]]
            row += [str(report["n_selected_matrices"]), str(report["changed_params"])]
            rows.append(" ".join(row))
            print(rows[-1], flush=True)
    if args.check is not None:
        expected = args.check.read_text().splitlines()
        if rows[0] != expected[0]:
            sys.exit(
                f"{args.check} is for another organism build ({expected[0]}; this one: "
                f"{rows[0]}): compare with the digests the old commit gives here instead"
            )
        changed = [f"- {a}\n+ {b}" for a, b in zip(expected, rows, strict=True) if a != b]
        if changed:
            sys.exit("digests differ:\n" + "\n".join(changed))
        print(f"all {len(rows) - 1} digests equal {args.check}")


if __name__ == "__main__":
    main()
