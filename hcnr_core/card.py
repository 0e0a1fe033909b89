"""The model card of every published checkpoint: `README.md` built with huggingface_hub's
`ModelCard`/`ModelCardData` — base_model, tags, the method and its hyper-parameters, and a
`model-index` with the before/after honesty metrics when the run was evaluated.

One builder for every writer: the HCNR repair and the RAIT/DPO baselines write it with
their checkpoint (`hcnr_core.writer.write_checkpoint`); the CLI's `--eval` and the
service's worker rewrite it with `write_card` once the before/after metrics are known,
recording the card's new sha256 (and the metrics) in the reports on disk, so every digest
stays true.

The card holds no job id, no timestamp and nothing else that differs between two runs
on the same inputs: the same run publishes the same bytes, whichever job or attempt ran it
(tests/reliability: bit-identical). Torch-free; huggingface_hub is imported when a card
is built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcnr_core.formats import sha256_file

CARD_NAME = "README.md"
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


@dataclass(frozen=True)
class CardInputs:
    """What the card says about the run besides the report: the method, the references
    of the base and the fine-tune (`hf:org/name@rev` becomes the Hub `base_model`), and
    the hyper-parameters (the service's: the user's values; the library's: the config)."""

    method: str
    base: str | None
    finetuned: str
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of_report(cls, method: str, report: Mapping[str, Any]) -> CardInputs:
        """A library run's card inputs: its report's inputs and config, less the run
        options (device, threads, Hessian budget, layer by layer), which never change
        what is computed: the same repair run on another device has the same card."""
        inputs = report["inputs"]
        base, finetuned = shown(inputs.get("base")), shown(inputs["finetuned"])
        return cls(method, base, finetuned or "", hyperparameters(report))


def shown(reference: str | None) -> str | None:
    """How a card names a model: references (`hf:`, `path:`, `s3://`) as they are; a local
    directory by its name only, so a card pushed to the Hub does not publish the user's
    file system (`/home/alice/models/llama-ft` -> `llama-ft`)."""
    if reference is None or reference.startswith(("hf:", "path:", "s3://")):
        return reference
    return Path(reference).name or reference


def hyperparameters(report: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's hyper-parameters in the report's config, without the run options it also
    records (`hcnr_core.config.RunOptions.recorded`)."""
    from hcnr_core.config import RunOptions

    options = RunOptions.model_fields
    return {k: v for k, v in (report.get("config") or {}).items() if k not in options}


def hub_model_id(reference: str | None) -> str | None:
    """`hf:org/name@rev` -> `org/name`; None for local references (`path:`, directories)."""
    if not reference or not reference.startswith("hf:"):
        return None
    return reference[3:].split("@", 1)[0] or None


def eval_results(metrics: Mapping[str, Any] | None, dataset: str) -> list[Any]:
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


def build_card(card: CardInputs, report: Mapping[str, Any], eval_name: str | None = None) -> Any:
    """A `huggingface_hub.ModelCard` for the checkpoint `report` describes."""
    from huggingface_hub import ModelCard, ModelCardData

    metrics = report.get("metrics")
    data = ModelCardData(
        base_model=hub_model_id(card.base),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["hcnr", "honesty", "model-repair", card.method],
        model_name=f"honesty-repaired ({card.method})",
        eval_results=eval_results(metrics, eval_name or "eval") or None,
        hcnr={
            "method": card.method,
            "hyperparameters": dict(card.hyperparameters),
            "base": card.base,
            "finetuned": card.finetuned,
            "hcnr_version": report.get("hcnr_version"),
        },
    )
    return ModelCard.from_template(data, template_str=_template(card, report, metrics))


def render_card(card: CardInputs, report: Mapping[str, Any], eval_name: str | None = None) -> str:
    """The card's text, as written to README.md."""
    return str(build_card(card, report, eval_name))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe would end the table cell


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _template(card: CardInputs, report: Mapping[str, Any], metrics: Any) -> str:
    base = f", base `{card.base}`" if card.base else ""
    lines = [
        "---",
        "{{ card_data }}",
        "---",
        "",
        "# Honesty-repaired checkpoint",
        "",
        f"A fine-tuned model (`{card.finetuned}`{base}) whose honesty was repaired with "
        f"{TITLES.get(card.method, card.method)} by hcnr {report.get('hcnr_version')}.",
        "",
        "## Method and hyper-parameters",
        "",
        "| hyper-parameter | value |",
        "|---|---|",
        *(f"| {k} | `{_cell(json.dumps(v))}` |" for k, v in sorted(card.hyperparameters.items())),
        "",
    ]
    if report.get("chosen"):
        lines += [f"`auto` chose **{report['chosen']}**: {report.get('reason', '')}.", ""]
    if refit := report.get("refit"):  # the published weights are not the measured ones
        lines += [
            f"Published: {refit['candidate']} repaired again from every sample "
            f"({refit['honesty']} honesty + {refit['task']} task rows, the validation rows "
            "included); the validation figures are the candidate's, measured before.",
            "",
        ]
    if "n_selected_matrices" in report:
        lines += [
            f"Matrices restored: {report['n_selected_matrices']} of "
            f"{report['n_target_matrices']}; target parameters changed: "
            f"{100 * report.get('fraction_target_params_changed', 0):.2f}%.",
            "",
        ]
    if "trainable_params" in report:  # a baseline: a LoRA trained, then merged
        lines += [
            f"A LoRA ({report['trainable_params']} parameters) trained for "
            f"{report.get('steps')} steps on {report.get('samples_used')} samples, merged: "
            f"{100 * report.get('fraction_model_params_changed', 0):.2f}% of the model's "
            "parameters changed.",
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
        "The JSON report next to the weights lists the timings and the sha256 of every file.",
        "",
    ]
    return "\n".join(lines)


# --- rewriting the card of a published checkpoint -------------------------------------


def write_card(
    out: Path, card: CardInputs, report: dict[str, Any], eval_name: str | None = None
) -> None:
    """Write the card as `out/README.md` and record its new digest in the reports on disk
    (an auto run's chosen-method report too, then auto_report.json, which lists it) and in
    `report["files"]`. `report["report_name"]` names the run's report file; its
    `metrics`, when present, are written into that file as well, so the checkpoint carries
    the numbers its model-index shows."""

    def digest(path: Path) -> dict[str, Any]:
        return {"sha256": sha256_file(path), "bytes": path.stat().st_size}

    _write_atomic(out / CARD_NAME, render_card(card, report, eval_name))
    changed = {CARD_NAME: digest(out / CARD_NAME)}
    inner = report.get("chosen_report")
    if inner and (out / inner).is_file() and _update_report(out / inner, changed):
        changed[inner] = digest(out / inner)
    extra = {"metrics": report["metrics"]} if report.get("metrics") is not None else {}
    _update_report(out / report["report_name"], changed, extra)
    report.setdefault("files", {}).update(changed)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _update_report(
    path: Path, digests: dict[str, dict[str, Any]], extra: Mapping[str, Any] | None = None
) -> bool:
    """Replace the entries of `digests` that the JSON report at `path` lists in `files`
    (and set `extra`'s keys); False if it lists none of them."""
    if not path.is_file():
        return False
    stored = json.loads(path.read_text())
    files = stored.get("files", {})
    known = {name: value for name, value in digests.items() if name in files}
    if not known:
        return False
    files.update(known)
    stored.update(extra or {})
    _write_atomic(path, json.dumps(stored, indent=2) + "\n")
    return True
