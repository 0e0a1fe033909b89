"""Report helpers: library versions and the model card written next to the weights."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from hcnr_core import __version__


def versions() -> dict[str, str]:
    out = {"hcnr": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "safetensors", "tokenizers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def build_model_card(report: dict[str, Any]) -> str:
    cfg = report["config"]
    inputs = report["inputs"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [hcnr, honesty, model-repair]",
        "---",
        "",
        "# Honesty-repaired checkpoint (HCNR)",
        "",
        "This checkpoint is a fine-tuned model whose honesty-critical weight columns were",
        "restored to their pre-trained values and compensated with HCNR (Honesty-Critical",
        "Neurons Restoration; Shi et al., AAAI 2026, arXiv 2511.12991). No retraining was done.",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{inputs['base']}` |",
        f"| fine-tuned | `{inputs['finetuned']}` ({inputs['finetuned_kind']}) |",
        f"| honesty / task samples | {inputs['honesty']['samples']} / "
        f"{inputs['task']['samples']} |",
        f"| R_IW / R_CW | {cfg['r_iw']} / {cfg['r_cw']} |",
        f"| compensation / selection | {cfg['compensation']} / {cfg['selection']} |",
        f"| matrices restored | {report['n_selected_matrices']} of {report['n_target_matrices']} |",
        f"| target parameters changed | {100 * report['fraction_target_params_changed']:.2f}% |",
        f"| hcnr version | {report['hcnr_version']} |",
        "",
        "`hcnr_report.json` lists every restored column, the timings and the sha256 of",
        "every file. Load it like any Hugging Face causal LM:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        "```",
        "",
    ]
    return "\n".join(lines)
