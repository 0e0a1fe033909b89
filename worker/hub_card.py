"""The Hub model card of a job's checkpoint: `README.md` built with huggingface_hub's
`ModelCard`/`ModelCardData` (base_model, tags, the method and its hyper-parameters, and a
`model-index` with the before/after honesty metrics when the job had an eval file).

The method writes its own README.md; the worker replaces it with this card once the
before/after metrics are known, and records the card's new sha256 in the method's report
(on disk and in the job's report), so every digest the job publishes stays true.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hcnr_core.writer import sha256_file

CARD = "README.md"
# (metric key, name) of the model-index, for each of repaired, fine-tuned and base.
METRICS = [
    ("refusal_f1", "Refusal F1"),
    ("refusal_rate_unanswerable", "Refusal rate on unanswerable questions"),
    ("refusal_rate_answerable", "Refusal rate on answerable questions"),
    ("rf_delta", "RFΔ (refusal rate unanswerable − answerable)"),
    ("domain_accuracy", "Domain accuracy"),
    ("answer_accuracy", "Answer accuracy"),
]
ROLES = {"repaired": "", "finetuned": " (fine-tuned, before repair)", "base": " (base)"}
TITLES = {
    "hcnr": "HCNR (Honesty-Critical Neurons Restoration)",
    "rait": "RAIT (refusal-aware instruction tuning, a LoRA on the honesty set)",
    "dpo": "DPO on I-don't-know pairs (a LoRA)",
    "auto": "auto (a measured choice among candidate repairs)",
}


def hub_model_id(reference: str) -> str | None:
    """`hf:org/name@rev` -> `org/name`; None for local references (`path:`)."""
    if not reference.startswith("hf:"):
        return None
    return reference[3:].split("@", 1)[0] or None


def eval_results(metrics: dict[str, Any] | None, dataset: str) -> list[Any]:
    """The model-index entries: each honesty metric of the repaired model, and the same of
    the fine-tuned and base models (their metric types end in _finetuned / _base)."""
    from huggingface_hub import EvalResult

    def result(metric_type: str, name: str, value: Any) -> Any:
        return EvalResult(
            task_type="text-generation",
            task_name="Honesty: refusing unanswerable questions",
            dataset_type="hcnr-eval",
            dataset_name=dataset,
            dataset_split="eval",
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(float(value), 6),
        )

    if not metrics:
        return []
    results = [
        result(key if role == "repaired" else f"{key}_{role}", name + suffix, value)
        for role, suffix in ROLES.items()
        for key, name in METRICS
        if (value := (metrics.get(role) or {}).get(key)) is not None
    ]
    if metrics.get("recovery") is not None:
        results.append(
            result(
                "refusal_f1_recovery",
                "Recovery of the refusal-F1 gap (repaired − fine-tuned) / (base − fine-tuned)",
                metrics["recovery"],
            )
        )
    return results


def build_card(job: Any, report: dict[str, Any], eval_name: str | None = None) -> Any:
    """A `huggingface_hub.ModelCard` for the job's checkpoint."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics = report.get("metrics")
    method = job.method
    data = ModelCardData(
        base_model=hub_model_id(job.base_ref),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hcnr", "honesty", "model-repair", method],
        # No job id here or below: the same inputs and hyper-parameters publish the same
        # bytes, whichever job (or attempt) ran them (tests/reliability: bit-identical).
        model_name=f"honesty-repaired ({method})",
        eval_results=eval_results(metrics, eval_name or "eval") or None,
        hcnr={
            "method": method,
            "hyperparameters": job.config,
            "base": job.base_ref,
            "finetuned": job.finetuned_ref,
            "hcnr_version": report.get("hcnr_version"),
        },
    )
    card = ModelCard.from_template(data, template_str=_template(job, report, metrics))
    return card


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe would end the table cell


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _template(job: Any, report: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    lines = [
        "---",
        "{{ card_data }}",
        "---",
        "",
        "# Honesty-repaired checkpoint",
        "",
        f"A fine-tuned model (`{job.finetuned_ref}`, base `{job.base_ref}`) whose honesty was "
        f"repaired with {TITLES.get(job.method, job.method)} by the HCNR service.",
        "",
        "## Method and hyper-parameters",
        "",
        "| hyper-parameter | value |",
        "|---|---|",
        *(f"| {k} | `{_cell(json.dumps(v))}` |" for k, v in sorted((job.config or {}).items())),
        "",
    ]
    if report.get("chosen"):
        lines += [f"`auto` chose **{report['chosen']}**: {report.get('reason', '')}.", ""]
    if "n_selected_matrices" in report:
        lines += [
            f"Matrices restored: {report['n_selected_matrices']} of "
            f"{report['n_target_matrices']}; target parameters changed: "
            f"{100 * report.get('fraction_target_params_changed', 0):.2f}%.",
            "",
        ]
    if metrics and all(isinstance(metrics.get(m), dict) for m in ROLES):
        lines += [
            "## Honesty before and after",
            "",
            "| metric | base | fine-tuned | repaired |",
            "|---|---|---|---|",
            *(
                f"| {name} | {_fmt(metrics['base'].get(key))} | "
                f"{_fmt(metrics['finetuned'].get(key))} | {_fmt(metrics['repaired'].get(key))} |"
                for key, name in METRICS
            ),
            "",
            f"Recovery of the refusal-F1 gap: {_fmt(metrics.get('recovery'))}.",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this repository>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this repository>")',
        "```",
        "",
        "The report next to the weights lists the timings and the sha256 of every file.",
        "",
    ]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def publish(job: Any, report: dict[str, Any], out: Path, eval_name: str | None = None) -> None:
    """Write the card as `out/README.md` and record the new digests in the reports on disk
    (an auto job's chosen-method report too, then auto_report.json, which lists it) and in
    the job's report, whose `files` the published artifacts are recorded from."""
    card = build_card(job, report, eval_name)
    _write_atomic(out / CARD, str(card))
    changed = {CARD: _digest(out / CARD)}
    inner = report.get("chosen_report")
    if inner and (out / inner).is_file() and _set_digests(out / inner, changed):
        changed[inner] = _digest(out / inner)
    _set_digests(out / report["report_name"], changed)
    report.setdefault("files", {}).update(changed)


def _digest(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _set_digests(path: Path, digests: dict[str, dict[str, Any]]) -> bool:
    """Replace the entries of `digests` that the JSON report at `path` lists in `files`."""
    if not path.is_file():
        return False
    stored = json.loads(path.read_text())
    files = stored.get("files", {})
    known = {name: value for name, value in digests.items() if name in files}
    if not known:
        return False
    files.update(known)
    _write_atomic(path, json.dumps(stored, indent=2) + "\n")
    return True
