"""The HCNR repair as named stages, with a progress callback and cancellation checks.

    pipeline = RepairPipeline(RepairConfig(), progress=print, should_cancel=lambda: False)
    prepared = pipeline.prepare(base_dir, finetuned_dir, "honesty.jsonl", "task.jsonl")
    report = pipeline.run(prepared, out_dir)

`prepare` does every check that needs no weights (safety, compatibility, data); `run`
loads one model at a time, scores, selects, compensates and writes the checkpoint.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hcnr_core import __version__
from hcnr_core.batching import pad_token_id
from hcnr_core.card import CardInputs
from hcnr_core.checkpoint import (
    CheckpointInfo,
    TensorSource,
    check_adapter_matches,
    check_full_compatible,
    compute_dtype,
    inspect_checkpoint,
    load_tokenizer,
)
from hcnr_core.compensation import (
    RESTORE_ONLY,
    PreparedHessian,
    prepare_hessian,
    repair_prepared,
)
from hcnr_core.config import RepairConfig, RunOptions
from hcnr_core.data import EncodedSample, Sample, encode_samples, load_jsonl
from hcnr_core.devices import resolve_devices
from hcnr_core.errors import (
    CheckpointError,
    HCNRError,
    RepairCancelled,
    UnsupportedArchitectureError,
)
from hcnr_core.layerwise import check_layerwise_layout, layerwise_sequential
from hcnr_core.limits import check_data
from hcnr_core.progress import ProgressEvent
from hcnr_core.report import versions
from hcnr_core.runners import Placement, Runner, RunnerKind, runner_kind
from hcnr_core.scoring import CrossInputs, InputHessians
from hcnr_core.selection import displacement, select_columns, select_matrices
from hcnr_core.writer import (
    REPORT_NAME,
    CheckpointFiles,
    check_output_dir,
    sha256_file,
    write_checkpoint,
)

# Stage name -> share of the overall progress bar.
STAGES: dict[str, float] = {
    "load_finetuned": 0.05,
    "fisher_task": 0.3,
    "load_base": 0.05,
    "fisher_honesty": 0.3,
    "select": 0.04,
    "task_hessians": 0.0,  # compensation="task_aware" only (reloads the fine-tuned model)
    "compensate": 0.18,  # Hessians and compensation, chunk by chunk
    "save": 0.08,
}
# Stages timed in the report: the progress stages plus the Hessians' share of "compensate".
TIMED_STAGES = (*STAGES, "hessian")


@dataclass
class PreparedRepair:
    """Everything validated before any weights are loaded."""

    base: CheckpointInfo
    finetuned: CheckpointInfo
    tokenizer: Any
    honesty: list[EncodedSample]
    task: list[EncodedSample]
    targets: list[str]  # module names of the target linears, in model order
    inputs: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _samples(data: str | Path | Sequence[Sample], what: str) -> tuple[list[Sample], dict]:
    if isinstance(data, (str, Path)):
        path = Path(data)
        samples = load_jsonl(path)
        return samples, {"path": str(path), "sha256": sha256_file(path), "samples": len(samples)}
    return list(data), {"path": None, "samples": len(data), "what": what}


def target_linears(info: CheckpointInfo, pattern: str, layerwise: bool = False) -> list[str]:
    """nn.Linear module names matching `pattern`, found on a weightless (meta) model.

    An architecture whose matrices are not all nn.Linear (GPT-2's Conv1D, MoE experts
    stored as 3-D tensors) is refused here, in `prepare`: repairing only part of it would
    silently skip the rest.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(
            str(info.path), trust_remote_code=False, local_files_only=True
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{info.path}: unsupported model config: {exc}") from exc
    regex = re.compile(pattern)
    matched = [(name, m) for name, m in model.named_modules() if regex.search(name)]
    names = [name for name, m in matched if isinstance(m, torch.nn.Linear)]
    kind = type(model).__name__
    if not names:
        # The pattern may simply be wrong, unless the blocks hold matrices in other modules.
        matrices = _non_linear_matrices(model.named_modules())
        if matrices:
            raise UnsupportedArchitectureError(
                f"{kind} keeps its matrices in {matrices[0]}, not nn.Linear; "
                "HCNR repairs nn.Linear weights only"
            )
        raise CheckpointError(f"target_modules {pattern!r} matches no nn.Linear in the model")
    skipped = _non_linear_matrices(matched)
    if skipped:
        examples: dict[str, str] = {}
        for entry in skipped:
            examples.setdefault(entry.rsplit(" ", 1)[1], entry)  # the first of each class
        raise UnsupportedArchitectureError(
            f"{kind} keeps matrices outside nn.Linear among the targets (MoE experts?): "
            f"{', '.join(examples.values())}; HCNR repairs nn.Linear weights only"
        )
    if layerwise:
        check_layerwise_layout(model, names)
    missing = [n for n in names if f"{n}.weight" not in info.source()]
    if missing:
        raise CheckpointError(f"{info.path}: weights of {missing[:3]} not found in the checkpoint")
    return names


def _non_linear_matrices(modules: Iterable[tuple[str, torch.nn.Module]]) -> list[str]:
    """'name (Class)' of the 2-D or larger weights held outside nn.Linear and nn.Embedding."""
    return [
        f"{name}.{key} ({type(module).__name__})"
        for name, module in modules
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        for key, param in module.named_parameters(recurse=False)
        if param.dim() >= 2
    ]


class RepairPipeline:
    def __init__(
        self,
        config: RepairConfig,
        options: RunOptions | None = None,
        progress: Callable[[ProgressEvent], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        fisher_cache: dict[str, dict] | None = None,
        runners: RunnerKind | None = None,
        task_hessian_cache: dict[str, dict] | None = None,
    ):
        """`options`: how it runs (device, memory budget, layer by layer; default one
        CPU), apart from `config`, what it computes.

        `fisher_cache`: a dict shared by repairs of the same checkpoints and data with
        different selection/compensation settings (sweeps, candidate grids). The column
        Fisher scores depend only on the model, the data and the compute dtype, so each
        pass runs once per cache; the reused stages report ~0 s.

        `task_hessian_cache`: the same for H_task of task-aware compensation, which depends
        only on the fine-tuned model, D_task and the dtype (not on μ, R_CW or the Hessian
        inputs): the task-aware candidates of a grid run one task pass for the matrices
        they share. Kept while it fits `options.hessian_budget_mb`.

        `runners`: how the forward passes run (`hcnr_core.runners`); by default whole
        models, or block by block with `options.layerwise`."""
        self.config = config
        self.options = (options or RunOptions()).check_for(RepairConfig)
        self.runners = runners or runner_kind(
            self.options.layerwise, self.options.hessian_budget_mb
        )
        self._progress = progress
        self._should_cancel = should_cancel
        self._fisher_cache = fisher_cache
        self._task_hessian_cache = task_hessian_cache
        self.stage_seconds: dict[str, float] = {}
        self._stage = ""
        self.devices: list[torch.device] = []

    # --- progress and cancellation -------------------------------------------------

    def _check_cancel(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise RepairCancelled(f"cancelled during {self._stage}")

    def _tick(self, done: int, total: int, message: str = "") -> None:
        self._check_cancel()
        if self._progress is None:
            return
        names = list(STAGES)
        before = sum(STAGES[s] for s in names[: names.index(self._stage)])
        share = STAGES[self._stage] * (done / total if total else 1.0)
        self._progress(ProgressEvent(self._stage, done, total, min(1.0, before + share), message))

    def _enter(self, stage: str) -> float:
        self._stage = stage
        self._tick(0, 1)
        return time.perf_counter()

    def _leave(self, started: float) -> None:
        self.stage_seconds[self._stage] = round(time.perf_counter() - started, 4)
        self._tick(1, 1)

    # --- preparation -------------------------------------------------------------

    def prepare(
        self,
        base: str | Path,
        finetuned: str | Path,
        honesty: str | Path | Sequence[Sample],
        task: str | Path | Sequence[Sample],
    ) -> PreparedRepair:
        """All checks that need no weights: safety, compatibility, data, targets."""
        base_info, ft_info = inspect_checkpoint(base), inspect_checkpoint(finetuned)
        if base_info.kind != "full":
            raise CheckpointError(f"{base}: the base must be a full model, not an adapter")
        warnings: list[str] = []
        if ft_info.kind == "adapter":
            check_adapter_matches(
                base_info, ft_info, check_name=self.config.check_adapter_base_name
            )
        else:
            warnings += check_full_compatible(base_info, ft_info)
        tokenizer = load_tokenizer(ft_info, base_info)
        hon_samples, hon_meta = _samples(honesty, "honesty")
        task_samples, task_meta = _samples(task, "task")
        check_data(
            tokenizer,
            {"honesty": hon_samples, "task": task_samples},
            {"honesty": hon_meta.get("path"), "task": task_meta.get("path")},
        )
        max_len = self.config.max_seq_len
        hon = encode_samples(tokenizer, hon_samples, max_len, hon_meta.get("path") or "honesty")
        tsk = encode_samples(tokenizer, task_samples, max_len, task_meta.get("path") or "task")
        # Block by block (layer by layer, or the sequential calibrations): a Llama-like layout.
        blockwise = self.options.layerwise or self.config.hessian_inputs != "base"
        targets = target_linears(base_info, self.config.target_modules, blockwise)
        inputs = {
            "base": str(base_info.path),
            "finetuned": str(ft_info.path),
            "finetuned_kind": ft_info.kind,
            "honesty": hon_meta,
            "task": task_meta,
        }
        return PreparedRepair(base_info, ft_info, tokenizer, hon, tsk, targets, inputs, warnings)

    # --- the stages ----------------------------------------------------------------

    def _compute_dtype(self, prep: PreparedRepair) -> torch.dtype:
        return compute_dtype(self.config.dtype, prep.base)

    def _load_finetuned(
        self, prep: PreparedRepair, dtype: torch.dtype
    ) -> tuple[Runner, TensorSource]:
        """The fine-tuned model (one replica per device) for the forward passes, and W_s
        at its stored dtype."""
        return self.runners.finetuned(self._placement(prep, dtype))

    def _load_base(self, prep: PreparedRepair, source: TensorSource, dtype: torch.dtype) -> Runner:
        return self.runners.base(self._placement(prep, dtype), source)

    def _placement(self, prep: PreparedRepair, dtype: torch.dtype) -> Placement:
        return Placement(prep.base, prep.finetuned, dtype, self.devices, self._check_cancel)

    def _pad_id(self, prep: PreparedRepair) -> int:
        return pad_token_id(prep.tokenizer)

    def _batches(self, data: list[EncodedSample]) -> list[list[EncodedSample]]:
        """Batches of similar length (less padding); same order on every run."""
        ordered = sorted(data, key=lambda s: (len(s.input_ids), s.line))
        size = self.config.batch_size
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def _fisher(self, runner: Runner, prep: PreparedRepair, data: list[EncodedSample]) -> dict:
        """Column Fisher scores of `data`; each replica scores its share of the batches."""
        return runner.fisher(self._batches(data), prep.targets, self._pad_id(prep), self._tick)

    def _cached_fisher(
        self,
        runner: Runner,
        prep: PreparedRepair,
        scored: CheckpointInfo,
        data: list[EncodedSample],
        dtype: torch.dtype,
    ) -> dict:
        """`_fisher`, memoised in `fisher_cache` by what the scores depend on."""
        if self._fisher_cache is None:
            return self._fisher(runner, prep, data)
        settings = (str(dtype), prep.targets, self.config.target_modules)
        key = _digest(settings, prep, scored, data)
        if key not in self._fisher_cache:
            self._fisher_cache[key] = self._fisher(runner, prep, data)
        return self._fisher_cache[key]

    def _cached_task_hessians(
        self, prep: PreparedRepair, kept: list[str], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """`_task_hessians`, memoised in `task_hessian_cache` per matrix: a run that needs
        matrices the cached passes lack runs the task pass for those only. Not kept beyond
        `hessian_budget_mb` (the run itself holds its own H_task either way)."""
        if self._task_hessian_cache is None:
            return self._task_hessians(prep, kept, dtype)
        key = _digest((str(dtype), "task_hessians"), prep, prep.finetuned, prep.task)
        held = dict(self._task_hessian_cache.get(key, {}))
        missing = [w for w in kept if w.removesuffix(".weight") not in held]
        if missing:
            held.update(self._task_hessians(prep, missing, dtype))
            unique = {t.data_ptr(): t for t in held.values()}  # a shared-input group: one
            size = sum(t.numel() * t.element_size() for t in unique.values())
            if size <= self.options.hessian_budget_mb * 2**20:
                self._task_hessian_cache[key] = held
        return {m: held[m] for m in (w.removesuffix(".weight") for w in kept)}

    def _select(
        self,
        prep: PreparedRepair,
        hon: dict,
        task: dict,
        base_source: TensorSource,
        ft_source: TensorSource,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        columns, displacements = {}, {}
        for i, module in enumerate(prep.targets):
            weight = f"{module}.weight"
            columns[weight] = select_columns(
                cfg.selection,
                hon["scores"][module],
                task["scores"][module],
                cfg.r_iw,
                generator,
                cfg.fisher_mass if cfg.column_budget == "fisher_mass" else None,
            )
            displacements[weight] = displacement(
                base_source.get(weight), ft_source.get(weight), columns[weight]
            )
            self._tick(i + 1, len(prep.targets))
        return columns, displacements, select_matrices(displacements, cfg.r_cw)

    def _hessian_stream(
        self,
        runner: Runner,
        prep: PreparedRepair,
        modules: list[str],
        reference: Runner | None = None,
    ) -> Iterator[tuple[list[str], InputHessians | CrossInputs | None]]:
        """(modules, their Hessians) chunk by chunk; Hessians are None without compensation.
        `reference` (the base, asymmetric calibration): CrossInputs with H and C."""
        pad_id = self._pad_id(prep)
        check = lambda *_: self._check_cancel()  # noqa: E731  (progress counts matrices)
        batches = self._batches(prep.honesty)
        if self.config.compensation == "none" or not modules:
            yield modules, None
        elif self.config.hessian_inputs != "base":
            # One block at a time, the hidden states carried from block to block (one
            # forward pass): `_compensate` writes each block's repaired matrices into the
            # model before this generator moves the hidden states through that block.
            lm, ref = runner.blockwise(), None if reference is None else reference.blockwise()
            yield from layerwise_sequential(lm, batches, modules, pad_id, ref, check)
        else:
            yield from runner.hessians(batches, modules, pad_id, check)

    def _task_hessians(
        self, prep: PreparedRepair, kept: list[str], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """H_task of every kept matrix (CPU, fp32): inputs of the fine-tuned model on D_task.
        One model resident at a time, so the fine-tuned model is loaded again; members of
        a shared-input group share one tensor."""
        runner, _ = self._load_finetuned(prep, dtype)
        order = {f"{m}.weight": i for i, m in enumerate(prep.targets)}
        modules = [w.removesuffix(".weight") for w in sorted(kept, key=order.__getitem__)]
        found: dict[str, torch.Tensor] = {}
        check = lambda *_: self._check_cancel()  # noqa: E731
        stream = runner.hessians(self._batches(prep.task), modules, self._pad_id(prep), check)
        for chunk, hessians in stream:
            by_leader: dict[str, torch.Tensor] = {}
            for module in chunk:
                leader = hessians.group_of[module]
                if leader not in by_leader:
                    by_leader[leader] = hessians.hessian(module).cpu()
                found[module] = by_leader[leader]
            del hessians
        del runner
        _release_memory()
        return found

    def _compensate(
        self,
        runner: Runner,
        prep: PreparedRepair,
        kept: list[str],
        columns: dict[str, torch.Tensor],
        base_source: TensorSource,
        ft_source: TensorSource,
        keep: bool = True,
        task_hessians: dict[str, torch.Tensor] | None = None,
        reference: Runner | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Repaired matrices (stored dtype, CPU; none kept if not `keep`) and the number
        of weights that changed; Hessians built chunk by chunk."""
        cfg, device = self.config, self.devices[0]
        order = {f"{m}.weight": i for i, m in enumerate(prep.targets)}
        modules = [w.removesuffix(".weight") for w in sorted(kept, key=order.__getitem__)]
        repaired: dict[str, torch.Tensor] = {}
        changed, done = 0, 0
        hessian_seconds = 0.0
        stream = self._hessian_stream(runner, prep, modules, reference)
        while True:
            started = time.perf_counter()
            chunk, hessians = next(stream, (None, None))
            hessian_seconds += time.perf_counter() - started
            if chunk is None:
                break
            group = _shared_input_groups(chunk, hessians)
            left = Counter(group)  # members of each shared-input group still to repair
            prepared: dict[str, PreparedHessian] = {}
            for module, leader in zip(chunk, group, strict=True):
                weight = f"{module}.weight"
                w_ft = ft_source.get(weight)
                if leader not in prepared and columns[weight].numel():
                    # damped H (and for "paper" H⁻¹) once per shared input, not per matrix
                    hessian = hessians.hessian(module) if hessians else None
                    task_h = None if task_hessians is None else task_hessians[module]
                    cross = hessians.cross(module) if reference is not None else None
                    prepared[leader] = prepare_hessian(
                        cfg.compensation,
                        hessian,
                        cfg.damping,
                        None if task_h is None else task_h.to(device),
                        cfg.task_weight,
                        cross,
                    )
                new = repair_prepared(
                    prepared.get(leader, RESTORE_ONLY),
                    base_source.get(weight).to(device),
                    w_ft.to(device),
                    columns[weight].to(device),
                )
                left[leader] -= 1
                if not left[leader]:
                    prepared.pop(leader, None)  # one group's H⁻¹ resident at a time
                if not torch.isfinite(new).all():
                    raise HCNRError(f"{weight}: compensation produced non-finite values")
                new = new.to(dtype=w_ft.dtype)
                changed += int((new != w_ft.to(new.device)).sum())
                new = new.cpu()
                if keep:
                    repaired[weight] = new
                if cfg.hessian_inputs != "base":
                    runner.set_weight(module, new)
                done += 1
                self._tick(done, len(kept))
            del hessians
        self.stage_seconds["hessian"] = round(hessian_seconds, 4)
        return repaired, changed

    def run(self, prep: PreparedRepair, out: str | Path | None) -> dict[str, Any]:
        """Run every stage and publish the checkpoint at `out`; returns the report.

        `out=None` is a dry run: everything is computed and reported, nothing written.
        """
        cfg = self.config
        out = None if out is None else Path(out)
        if out is not None:
            check_output_dir(out)
        torch.manual_seed(cfg.seed)
        self.devices = resolve_devices(self.options.device)
        dtype = self._compute_dtype(prep)

        started = self._enter("load_finetuned")
        runner, ft_source = self._load_finetuned(prep, dtype)
        self._leave(started)

        started = self._enter("fisher_task")
        task_fisher = self._cached_fisher(runner, prep, prep.finetuned, prep.task, dtype)
        self._leave(started)
        del runner
        _release_memory()

        started = self._enter("load_base")
        base_source = prep.base.source()
        base: Runner | None = self._load_base(prep, base_source, dtype)
        self._leave(started)

        started = self._enter("fisher_honesty")
        hon_fisher = self._cached_fisher(base, prep, prep.base, prep.honesty, dtype)
        self._leave(started)

        started = self._enter("select")
        columns, displacements, kept = self._select(
            prep, hon_fisher, task_fisher, base_source, ft_source
        )
        self._leave(started)

        task_hessians = None
        if cfg.compensation == "task_aware" and kept:
            started = self._enter("task_hessians")
            base = None  # one model resident at a time
            _release_memory()
            task_hessians = self._cached_task_hessians(prep, kept, dtype)
            self._leave(started)

        started = self._enter("compensate")
        reference = None
        if cfg.hessian_inputs != "base" and kept:
            # H from the model being repaired: the fine-tuned model, whose matrices are
            # replaced block by block as they are repaired; "asymmetric" keeps the base
            # beside it for the base's own inputs.
            if cfg.hessian_inputs == "asymmetric":
                reference = base or self._load_base(prep, base_source, dtype)
            base = None
            _release_memory()
            runner, _ = self._load_finetuned(prep, dtype)
        else:
            runner = base or self._load_base(prep, base_source, dtype)
            base = None
        repaired, changed = self._compensate(
            runner,
            prep,
            kept,
            columns,
            base_source,
            ft_source,
            out is not None,
            task_hessians,
            reference,
        )
        del runner, reference
        _release_memory()
        self._leave(started)
        self.stage_seconds["compensate"] = round(
            self.stage_seconds["compensate"] - self.stage_seconds["hessian"], 4
        )

        started = self._enter("save")
        report = self._report(prep, columns, displacements, kept, changed, ft_source)
        report["fisher_mean_loss"] = {
            "honesty_on_base": hon_fisher["mean_loss"],
            "task_on_finetuned": task_fisher["mean_loss"],
        }
        if out is not None:
            self._write(prep, out, ft_source, repaired, report, started)
        self._leave(started)
        if out is None:  # written, the report keeps the timings its file has (`_write`)
            report["stage_seconds"] = dict(self.stage_seconds)
        return report

    # --- output ------------------------------------------------------------------

    def _report(
        self,
        prep: PreparedRepair,
        columns: dict[str, torch.Tensor],
        displacements: dict[str, float],
        kept: list[str],
        changed: int,
        ft_source: TensorSource,
    ) -> dict[str, Any]:
        target_params = sum(math.prod(ft_source.shape(w)) for w in displacements)
        all_params = sum(math.prod(ft_source.shape(k)) for k in ft_source.keys())
        restored = sum(ft_source.shape(w)[0] * columns[w].numel() for w in kept)
        return {
            "format_version": 1,
            "hcnr_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": prep.inputs,
            "config": self.options.recorded(self.config),
            "compute_dtype": str(self._compute_dtype(prep)).removeprefix("torch."),
            "n_target_matrices": len(displacements),
            "n_selected_matrices": len(kept),
            "selected_matrices": [
                {
                    "name": w,
                    "displacement": _finite(displacements[w]),
                    "n_columns": columns[w].numel(),
                    # the matrix's width: what n_columns is a fraction of (dashboards,
                    # trackers) without reading the checkpoint's headers again
                    "in_features": ft_source.shape(w)[1],
                    "columns": columns[w].tolist(),
                }
                for w in kept
            ],
            "target_params": target_params,
            "restored_params": restored,
            "changed_params": changed,
            "fraction_target_params_restored": restored / target_params if target_params else 0,
            "fraction_target_params_changed": changed / target_params if target_params else 0,
            "fraction_model_params_changed": changed / all_params if all_params else 0,
            "warnings": prep.warnings,
            "versions": versions(),
        }

    def _write(
        self,
        prep: PreparedRepair,
        out: Path,
        ft_source: TensorSource,
        repaired: dict[str, torch.Tensor],
        report: dict[str, Any],
        started: float,
    ) -> None:
        def tensor(name: str) -> torch.Tensor:
            return repaired[name] if name in repaired else ft_source.get(name)

        sizes = {
            k: math.prod(ft_source.shape(k)) * ft_source.dtype(k).itemsize for k in ft_source.keys()
        }
        model_dir = prep.finetuned.path if prep.finetuned.kind == "full" else prep.base.path
        token_dir = prep.finetuned.path if prep.finetuned.has_tokenizer else prep.base.path
        files = CheckpointFiles(model_dir, [prep.finetuned.path, prep.base.path], token_dir)

        def timed(report: dict[str, Any]) -> None:
            # The report cannot time its own writing: "save" stops before it.
            self.stage_seconds["save"] = round(time.perf_counter() - started, 4)
            report["stage_seconds"] = dict(self.stage_seconds)

        write_checkpoint(
            out,
            sizes,
            tensor,
            files,
            CardInputs.of_report("hcnr", report),
            report,
            REPORT_NAME,
            tick=lambda done, total: self._tick(done, total, _SAVE_STEPS[done]),
            before_report=timed,
        )


_SAVE_STEPS = {1: "tensors written", 2: "metadata written"}  # write_checkpoint's ticks


def _digest(
    settings: tuple, prep: PreparedRepair, scored: CheckpointInfo, data: list[EncodedSample]
) -> str:
    """A cache key: `settings`, the checkpoints (a LoRA adapter is scored merged onto the
    base, so the base counts too) and every token of `data`."""
    digest = hashlib.sha256(repr(settings).encode())
    for info in (prep.base, scored):
        digest.update(os.path.realpath(info.path).encode())
    for sample in data:
        digest.update(repr((sample.input_ids, sample.prompt_len)).encode())
    return digest.hexdigest()


def _shared_input_groups(chunk: list[str], hessians: InputHessians | None) -> list[str]:
    """Per module of `chunk`, the leader of its shared-input group (itself without H)."""
    if hessians is None:
        return list(chunk)
    return [hessians.group_of.get(module, module) for module in chunk]


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _finite(value: float) -> float | None:
    """JSON has no infinity: a matrix whose base columns are all zero reports null."""
    return value if math.isfinite(value) else None
