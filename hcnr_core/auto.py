"""`auto`: a measured choice among candidate repairs, not a guess.

    report = AutoMethod().run(AutoConfig(), MethodInputs(base, ft, honesty, task), "out/")

1. A validation split is carved deterministically (seeded, stratified by `answerable`)
   from the honesty and task sets — `validation_fraction` of each, and of the task set
   enough rows that one is at most `max_domain_drop` points (up to half of it) — or taken
   whole from a separate validation set. The repairs never see it.
2. The fine-tuned model (and the base) are evaluated on it: refusal F1 on the honesty rows,
   domain accuracy on the task rows (a task sample counts as kept when the model's greedy
   answer still contains its gold answer, or its response when it has no `answers`).
3. Each candidate (DEFAULT_CANDIDATES unless given) repairs the model from the remaining
   samples into a scratch directory and is evaluated the same way; HCNR candidates share
   one pair of Fisher passes, and the task-aware ones the task Hessians (within
   `hessian_budget_mb`). No candidate starts once `time_budget_s` would be exceeded. Each
   row records its stage timings (the repair's stages, then `validate`).
4. Chosen: the highest validation refusal F1 among candidates whose domain accuracy is at
   most `max_domain_drop` points below the fine-tuned model's and whose refusal F1 beats
   the fine-tuned model's (`require_improvement`; ties: the smaller drop, then the earlier
   candidate). None qualifies → `no_acceptable_candidate`, nothing published, and the
   message names the trade-offs that were measured and the limit that would accept each.

The chosen checkpoint is published at `out` with its own method report, `auto_report.json`
(every candidate: hyper-parameters, seconds, metrics, drop, why it was or was not chosen)
and `auto_frontier.png` (validation domain accuracy vs refusal F1, the choice marked).
The report states the split's sizes (`domain_point_per_sample`), so a reader can judge the
resolution of the limit: a 2-point limit needs 50 domain rows, which a task set of 100 or
more gives; with fewer, `warnings` says so and names the validation file that would.
"""

from __future__ import annotations

import math
import random
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hcnr_core import __version__
from hcnr_core.card import CardInputs, hyperparameters, write_card
from hcnr_core.config import AutoCandidate, AutoConfig, RunOptions
from hcnr_core.data import Sample, load_jsonl
from hcnr_core.errors import (
    DataValidationError,
    HCNRError,
    InvalidConfigError,
    NoAcceptableCandidateError,
    RepairCancelled,
)
from hcnr_core.methods import (
    METHODS,
    MethodInputs,
    Progress,
    ShouldCancel,
    options_for,
    require_inputs,
)
from hcnr_core.progress import ProgressEvent

REPORT_NAME = "auto_report.json"
FRONTIER_NAME = "auto_frontier.png"
# Options of the auto run that every candidate inherits unless it sets them itself.
INHERITED = ("seed", "dtype", "max_seq_len")
# The share of the task set a carve leaves to the repairs, whatever resolution it buys.
MIN_REPAIR_TASK_SHARE = 0.5


# --- the validation split ------------------------------------------------------------------


def carve(
    samples: Sequence[Sample], fraction: float, seed: int, salt: str
) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): `fraction` of each `answerable` class held out, at least one of a
    class with two or more samples; seeded and in the original order."""
    rng = random.Random(f"hcnr-auto-{salt}-{seed}")
    held: set[int] = set()
    for label in (True, False, None):
        group = [i for i, s in enumerate(samples) if s.answerable is label]
        if len(group) < 2:
            continue
        rng.shuffle(group)
        held.update(group[: max(1, round(fraction * len(group)))])
    kept = [s for i, s in enumerate(samples) if i not in held]
    return kept, [s for i, s in enumerate(samples) if i in held]


def rows_to_see(max_drop: float) -> int:
    """Domain rows needed for one row to be at most `max_drop` points: ⌈100 / max_drop⌉."""
    return math.ceil(100 / max_drop - 1e-9)


def domain_fraction(n_task: int, fraction: float, max_drop: float) -> float:
    """The share of the task set held out as domain rows: `fraction`, raised until one row is
    at most `max_drop` points (n_val >= 100 / max_drop) while the repairs keep at least
    MIN_REPAIR_TASK_SHARE of the task set.

    A limit finer than one row cannot be honoured: with 32 rows one answer is 3.1 points, so
    a 2-point limit rejects any candidate that loses a single answer, however honest."""
    if max_drop <= 0 or n_task == 0:
        return fraction
    needed = rows_to_see(max_drop) / n_task
    return max(fraction, min(needed, 1 - MIN_REPAIR_TASK_SHARE))


def as_domain(sample: Sample) -> Sample:
    """A task sample graded by its gold answers, or by its response when it has none."""
    return replace(sample, answerable=None, answers=sample.answers or (sample.response,))


def _load(data: str | Path | Sequence[Sample]) -> list[Sample]:
    return load_jsonl(Path(data)) if isinstance(data, (str, Path)) else list(data)


def split(config: AutoConfig, inputs: MethodInputs) -> dict[str, Any]:
    """The repair inputs and the validation sets (checked: both kinds of rows present)."""
    require_inputs(inputs, "auto", "base", "task")
    honesty, task = _load(inputs.honesty), _load(inputs.task)  # type: ignore[arg-type]
    totals = {"honesty": len(honesty), "task": len(task)}  # what a refit repairs from
    if inputs.validation is not None:
        rows = _load(inputs.validation)
        val_honesty = [s for s in rows if s.answerable is not None]
        val_domain = [as_domain(s) for s in rows if s.answerable is None]
        source, task_share = "given", None
    else:
        honesty, val_honesty = carve(honesty, config.validation_fraction, config.seed, "honesty")
        task_share = domain_fraction(len(task), config.validation_fraction, config.max_domain_drop)
        task, val_task = carve(task, task_share, config.seed, "task")
        val_honesty = [s for s in val_honesty if s.answerable is not None]
        val_domain = [as_domain(s) for s in val_task]
        source = "carved"
    where = "the validation set" if source == "given" else "the honesty set"
    if not any(s.answerable is False for s in val_honesty):
        raise DataValidationError(
            where,
            [(0, "auto needs unanswerable samples ('answerable': false) to measure "
                 "refusal on a validation split")],
        )  # fmt: skip
    if not val_domain:
        raise DataValidationError(where, [(0, "auto needs domain rows to measure the domain")])
    warnings = []
    point = 100 / len(val_domain)
    if config.max_domain_drop > 0 and point > config.max_domain_drop:
        rows = rows_to_see(config.max_domain_drop)
        larger = f"a task set of at least {2 * rows} samples or " if source == "carved" else ""
        warnings.append(
            f"one domain row is {point:.1f} points of validation accuracy, more than "
            f"max_domain_drop ({config.max_domain_drop:g}): a smaller loss cannot be seen; "
            f"give {larger}a validation file with at least {rows} graded domain rows"
        )
    if not any(s.answerable for s in val_honesty):
        warnings.append(
            "the validation split has no answerable honesty samples: over-refusal shows "
            "only in the domain accuracy; add answerable samples ('answerable': true)"
        )
    return {
        "inputs": MethodInputs(inputs.base, inputs.finetuned, honesty, task),
        "validation": {"honesty": val_honesty, "domain": val_domain},
        "totals": totals,
        "summary": {
            "source": source,
            "fraction": config.validation_fraction if source == "carved" else None,
            "domain_fraction": None if task_share is None else round(task_share, 4),
            "n_answerable": sum(bool(s.answerable) for s in val_honesty),
            "n_unanswerable": sum(s.answerable is False for s in val_honesty),
            "n_domain": len(val_domain),
            "domain_point_per_sample": round(100 / len(val_domain), 3),
            "repair_honesty": len(honesty),
            "repair_task": len(task),
        },
        "warnings": warnings,
    }


# --- candidates ----------------------------------------------------------------------------


def candidate_config(
    candidate: AutoCandidate, config: AutoConfig, options: RunOptions | None = None
) -> Any:
    """The candidate's spec; with `options`, also refused when its method cannot run with
    them (RAIT/DPO on several devices)."""
    values = {k: getattr(config, k) for k in INHERITED}
    values.update(candidate.hyperparameters)
    try:
        spec = METHODS[candidate.method].make_config(values)
        if options is not None:
            options.check_for(type(spec))
        return spec
    except (ValidationError, ValueError, InvalidConfigError) as exc:
        raise InvalidConfigError(f"candidate {candidate.name!r}: {exc}") from exc


def _gains(row: dict[str, Any], floor_f1: float | None) -> bool:
    """Whether a candidate's validation refusal F1 beats the floor (none: every one does)."""
    return floor_f1 is None or row["refusal_f1"] > floor_f1 + 1e-9


def choose(
    rows: list[dict[str, Any]], max_drop: float, floor_f1: float | None = None
) -> tuple[dict[str, Any] | None, str]:
    """The most honest measured candidate within `max_drop` points, and why.

    With `floor_f1` (the fine-tuned model's validation refusal F1) a candidate must also beat
    it: otherwise the most "honest" candidate within the limit can be one that changed
    nothing, and auto would publish the fine-tune under a repair's name."""
    measured = [r for r in rows if r["status"] == "ok"]
    for row in measured:
        row["qualified"] = row["domain_drop_points"] <= max_drop + 1e-9 and _gains(row, floor_f1)
    qualified = [r for r in measured if r["qualified"]]
    if not qualified:
        if floor_f1 is None:
            return None, f"no candidate lost at most {max_drop} points of domain accuracy"
        return None, (
            f"no candidate raised validation refusal F1 above the fine-tuned model's "
            f"({floor_f1:.3f}) while losing at most {max_drop} points of domain accuracy"
        )
    best = max(qualified, key=lambda r: (r["refusal_f1"], -r["domain_drop_points"], -r["order"]))
    return best, (
        f"highest validation refusal F1 ({best['refusal_f1']:.3f}) among {len(qualified)} "
        f"candidate(s) within {max_drop} points of the fine-tuned domain accuracy"
    )


def advice(rows: list[dict[str, Any]], floor_f1: float | None, point: float) -> str:
    """What a user can do when nothing qualified: the candidates that did raise honesty, each
    with the `max_domain_drop` that would accept it, most honest first."""
    gains = [r for r in rows if r["status"] == "ok" and _gains(r, floor_f1)]
    if not gains:
        return (
            "No candidate raised honesty at any domain cost: check that the honesty set's "
            "refusals are what the base model says, or give more honesty samples"
        )
    gains.sort(key=lambda r: (-r["refusal_f1"], r["domain_drop_points"]))
    offers = "; ".join(
        f"{r['name']} (F1 {r['refusal_f1']:.3f}) with max_domain_drop >= "
        f"{max(r['domain_drop_points'], 0.0):.1f}"
        for r in gains[:3]
    )
    return (
        f"Accept a trade-off: {offers}; or give a validation file with more domain rows "
        f"(one row is {point:.1f} points here), or run method hcnr with chosen hyper-parameters"
    )


# --- the method --------------------------------------------------------------------------


class AutoMethod:
    """Try candidates, measure them on a validation split, publish the best that qualifies."""

    name, title, report_name = "auto", "auto (measured choice)", REPORT_NAME
    config_type = AutoConfig

    def make_config(self, values: dict[str, Any]) -> AutoConfig:
        return AutoConfig(**values)

    def check(
        self, config: AutoConfig, inputs: MethodInputs, options: RunOptions | None = None
    ) -> list[str]:
        options = options_for(config, options)
        parts = split(config, inputs)
        warnings: list[str] = list(parts["warnings"])
        checked: set[str] = set()
        for candidate in config.tried():
            method_config = candidate_config(candidate, config, options)
            if candidate.method not in checked:  # the data and checkpoints, once per method
                warnings += METHODS[candidate.method].check(method_config, parts["inputs"], options)
                checked.add(candidate.method)
        return warnings

    def run(
        self,
        config: AutoConfig,
        inputs: MethodInputs,
        out: str | Path,
        *,
        options: RunOptions | None = None,
        progress: Progress | None = None,
        should_cancel: ShouldCancel | None = None,
        cache: dict | None = None,
    ) -> dict[str, Any]:
        # The writer imports torch; the API resolves auto's candidates without it.
        from hcnr_core.writer import check_output_dir

        options = options_for(config, options)  # every candidate runs with these
        out = Path(out)
        check_output_dir(out)
        started = time.monotonic()
        parts = split(config, inputs)
        cache = {} if cache is None else cache  # the candidates (and a refit) share passes
        candidates = config.tried()
        # all valid before work
        configs = [candidate_config(c, config, options) for c in candidates]
        work = out.parent / f".{out.name}.auto-{uuid.uuid4().hex[:12]}"
        work.mkdir(parents=True)
        run = _AutoRun(progress, should_cancel, len(candidates))
        try:
            run.stage("validate_reference", 0)
            begun = time.monotonic()
            reference = {
                name: _evaluate(model, base, parts["validation"], config, options)
                for name, model, base in (
                    ("finetuned", inputs.finetuned, inputs.base),
                    ("base", inputs.base, None),
                )
            }
            reference_seconds = round(time.monotonic() - begun, 3)
            rows = self._candidates(
                candidates, configs, parts, reference, config, options, work, run, started, cache
            )
            floor = reference["finetuned"]["refusal_f1"] if config.require_improvement else None
            chosen, reason = choose(rows, config.max_domain_drop, floor)
            if chosen is None:
                summary = "; ".join(
                    f"{r['name']}: F1 {r['refusal_f1']:.3f}, drop {r['domain_drop_points']:.1f}"
                    for r in rows
                    if r["status"] == "ok"
                )
                point = parts["summary"].get("domain_point_per_sample") or 0.0
                what_next = f". {advice(rows, floor, point)}" if summary else ""
                raise NoAcceptableCandidateError(
                    f"{reason} ({summary or 'none measured'}){what_next}"
                )
            published, refit = work / chosen["name"], None
            if config.refit and parts["summary"]["source"] == "carved":
                run.stage("refit", len(candidates) + 1)
                published, refit = _refit(chosen, configs, inputs, parts, options, work, run, cache)
            run.stage("publish", len(candidates) + 1.5)
            report = {
                "format_version": 1,
                "method": "auto",
                "hcnr_version": __version__,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": options.recorded(config),
                "validation": parts["summary"],
                "reference": reference,
                "candidates": rows,
                "chosen": chosen["name"],
                "chosen_method": chosen["method"],
                "reason": reason,
                "chosen_report": METHODS[chosen["method"]].report_name,
                "warnings": parts["warnings"],
                # Set when the published model is the chosen setting repaired again from
                # every sample (`refit`): its validation figures are the candidate's.
                "refit": refit,
                # The job's stage timings: the reference evaluation, then each candidate's
                # repair and validation under the `c<N>` its progress events carry.
                "stage_seconds": {
                    "validate_reference": reference_seconds,
                    **{f"c{r['order'] + 1}": r["seconds"] for r in rows if "seconds" in r},
                    **({"refit": refit["seconds"]} if refit else {}),
                },
            }
            base = None if inputs.base is None else str(inputs.base)
            card = CardInputs("auto", base, str(inputs.finetuned), hyperparameters(report))
            _publish(published, out, report, config, run, card)
            return report
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _candidates(
        self,
        candidates: list[AutoCandidate],
        configs: list[Any],
        parts: dict[str, Any],
        reference: dict[str, dict[str, Any]],
        config: AutoConfig,
        options: RunOptions,
        work: Path,
        run: _AutoRun,
        started: float,
        cache: dict,
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        spent: list[float] = []
        for order, (candidate, method_config) in enumerate(zip(candidates, configs, strict=True)):
            row: dict[str, Any] = {
                "order": order,
                "name": candidate.name,
                "method": candidate.method,
                "hyperparameters": dict(candidate.hyperparameters),
            }
            elapsed = time.monotonic() - started
            if spent and elapsed + sum(spent) / len(spent) > config.time_budget_s:
                row.update(status="skipped", reason=f"time budget {config.time_budget_s:g} s")
                rows.append(row)
                run.record(row)
                continue
            begun = time.monotonic()
            method = METHODS[candidate.method]
            try:
                report = method.run(
                    method_config,
                    parts["inputs"],
                    work / candidate.name,
                    options=options,
                    progress=run.inner(order),
                    should_cancel=run.should_cancel,
                    cache=cache,
                )
                run.stage(f"validate_{order + 1}", order + 1.9)
                validating = time.monotonic()
                metrics = _evaluate(
                    work / candidate.name, None, parts["validation"], config, options
                )
                # Where a candidate's time goes (the repair's stages, then its validation):
                # what a user shortening the grid or the budget needs to see.
                row["stage_seconds"] = {
                    **report.get("stage_seconds", {}),
                    "validate": round(time.monotonic() - validating, 3),
                }
            except RepairCancelled:
                raise
            except HCNRError as exc:  # one candidate failing does not sink the others
                row.update(status="failed", error={"code": exc.code, "message": str(exc)})
            else:
                ft = reference["finetuned"]
                drop = 100 * ((ft["domain_accuracy"] or 0.0) - (metrics["domain_accuracy"] or 0.0))
                row.update(
                    status="ok",
                    **metrics,
                    domain_drop_points=round(drop, 4),
                    recovery=_recovery(metrics, reference),
                )
            row["seconds"] = round(time.monotonic() - begun, 3)
            spent.append(row["seconds"])
            rows.append(row)
            run.record(row)
        return rows


def _refit(
    chosen: dict[str, Any],
    configs: list[Any],
    inputs: MethodInputs,
    parts: dict[str, Any],
    options: RunOptions,
    work: Path,
    run: _AutoRun,
    cache: dict,
) -> tuple[Path, dict[str, Any]]:
    """The chosen setting repaired again from all the honesty and task samples, the carved
    validation rows included (select on a split, then fit on everything).

    The choice and its validation figures stay the candidate's: the refit model has seen
    the validation rows, so it cannot be measured on them."""
    full = MethodInputs(inputs.base, inputs.finetuned, inputs.honesty, inputs.task)
    begun = time.monotonic()
    METHODS[chosen["method"]].run(
        configs[chosen["order"]],
        full,
        work / ".refit",
        options=options,
        should_cancel=run.should_cancel,
        cache=cache,
    )
    return work / ".refit", {
        "candidate": chosen["name"],
        **parts["totals"],
        "seconds": round(time.monotonic() - begun, 3),
    }


def _recovery(metrics: dict[str, Any], reference: dict[str, dict[str, Any]]) -> float | None:
    from hcnr_core.evaluation import recovery

    return recovery(
        metrics["refusal_f1"],
        reference["finetuned"]["refusal_f1"],
        reference["base"]["refusal_f1"],
    )


def _evaluate(
    model_dir: Any,
    base_dir: Any,
    validation: dict[str, list[Sample]],
    config: AutoConfig,
    options: RunOptions,
) -> dict[str, Any]:
    """Refusal F1 and domain accuracy on the validation split (greedy)."""
    import torch

    from hcnr_core.evaluation import GenerationSettings, evaluate_samples, load_for_eval

    device = options.device.split(",")[0]
    model, tokenizer = load_for_eval(model_dir, base_dir, device)
    try:
        settings = GenerationSettings(config.batch_size, config.max_new_tokens, config.max_seq_len)
        metrics = evaluate_samples(model, tokenizer, validation, settings=settings)["metrics"]
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    keep = ("refusal_f1", "refusal_rate_unanswerable", "refusal_rate_answerable", "rf_delta")
    return {
        **{k: metrics[k] for k in keep},
        "answer_accuracy": metrics["answer_accuracy"],
        "domain_accuracy": metrics["domain_accuracy"],
    }


class _AutoRun:
    """Progress over the whole auto run: reference (1 slot), candidates, publish (1 slot)."""

    def __init__(self, progress: Progress | None, should_cancel: ShouldCancel | None, n: int):
        self.progress, self._cancel, self.slots = progress, should_cancel, n + 2
        self.current = ""

    def should_cancel(self) -> bool:
        return bool(self._cancel and self._cancel())

    def _emit(self, event: ProgressEvent, cancellable: bool = True) -> None:
        if cancellable and self.should_cancel():
            raise RepairCancelled(f"cancelled during {event.stage}")
        if self.progress is not None:
            self.progress(event)

    def stage(self, name: str, slot: float, cancellable: bool = True) -> None:
        self.current = name
        self._emit(ProgressEvent(name, 0, 1, slot / self.slots), cancellable)

    def inner(self, order: int) -> Progress:
        """A candidate's own progress, as `c<N>/<stage>`: 90% of its slot, then validation."""

        def on_event(event: ProgressEvent) -> None:
            fraction = (order + 1 + 0.9 * event.fraction) / self.slots
            self._emit(replace(event, stage=f"c{order + 1}/{event.stage}"[:32], fraction=fraction))

        return on_event

    def record(self, row: dict[str, Any]) -> None:
        if self.progress is None:
            return
        if row["status"] == "ok":
            message = (
                f"candidate {row['name']}: refusal F1 {row['refusal_f1']:.3f}, domain "
                f"{row['domain_accuracy']:.3f} (drop {row['domain_drop_points']:.1f} points)"
            )
        else:
            message = f"candidate {row['name']}: {row['status']}"
        slot = (row["order"] + 2) / self.slots
        self.progress(ProgressEvent(self.current, 1, 1, slot, message, record=dict(row)))


def _publish(
    chosen: Path,
    out: Path,
    report: dict[str, Any],
    config: AutoConfig,
    run: _AutoRun,
    card: CardInputs,
) -> None:
    """The chosen checkpoint, its own report, auto_report.json, the frontier PNG and the
    card of the auto run (which candidate it chose and why; the chosen method's report
    records the new card's digest)."""
    from hcnr_core.writer import StagedOutput

    with StagedOutput(out) as staged:
        for path in sorted(chosen.iterdir()):
            if path.is_file() and not path.is_symlink():
                shutil.move(str(path), staged.dir / path.name)
        write_card(staged.dir, card, {**report, "report_name": REPORT_NAME})
        if _plot(report, config, staged.dir / FRONTIER_NAME) is None:
            report.setdefault("warnings", []).append("matplotlib is not installed: no PNG")
        staged.write_report(REPORT_NAME, report)
        staged.publish()
    run.stage("published", run.slots, cancellable=False)  # too late to cancel


def _plot(report: dict[str, Any], config: AutoConfig, path: Path) -> Path | None:
    """Validation domain accuracy vs refusal F1 of every candidate, the choice marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ft, base = report["reference"]["finetuned"], report["reference"]["base"]
    for name, ref, marker in (("fine-tuned", ft, "s"), ("base", base, "D")):
        ax.scatter(100 * (ref["domain_accuracy"] or 0), 100 * ref["refusal_f1"], marker=marker,
                   color="grey", label=name)  # fmt: skip
    measured = [r for r in report["candidates"] if r["status"] == "ok"]
    for row in measured:
        color = "tab:green" if row["qualified"] else "tab:red"
        x, y = 100 * (row["domain_accuracy"] or 0), 100 * row["refusal_f1"]
        ax.scatter(x, y, color=color)
        ax.annotate(row["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    chosen = next(r for r in measured if r["name"] == report["chosen"])
    ax.scatter(
        100 * (chosen["domain_accuracy"] or 0),
        100 * chosen["refusal_f1"],
        marker="*",
        s=300,
        facecolors="none",
        edgecolors="black",
        label=f"chosen: {chosen['name']}",
    )
    limit = 100 * (ft["domain_accuracy"] or 0) - config.max_domain_drop
    ax.axvline(limit, linestyle="--", color="grey", label=f"-{config.max_domain_drop:g} points")
    ax.set_xlabel("domain accuracy on validation (%)")
    ax.set_ylabel("refusal F1 on validation (%)")
    ax.set_title("auto: candidates on the validation split")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
