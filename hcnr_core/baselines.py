"""The methods HCNR is compared against (DESIGN.md §8): RAIT and DPO on IDK data.

Both train a fresh peft LoRA on top of the fine-tuned model (an adapter fine-tune is
merged into its base first), merge it and write a full checkpoint through the staged
writer, so the output loads with `from_pretrained` like a repaired one:

    report = train_rait("base/", "finetuned-adapter/", "honesty.jsonl", "rait/", RaitConfig())
    report = train_dpo("base/", "finetuned-adapter/", "honesty.jsonl", "dpo/", DpoConfig(),
                       options=RunOptions(device="cuda:0", threads=1))

- RAIT (refusal-aware instruction tuning, R-Tuning style): supervised fine-tuning on the
  honesty set itself — refusals for unanswerable prompts, gold answers for answerable
  ones — with TRL's `SFTTrainer`, the loss on response tokens only.
- DPO on IDK preference pairs with TRL's `DPOTrainer`: unanswerable prompt → chosen = the
  refusal, rejected = the fine-tuned model's own greedy answer (a gold answer of another
  sample if it already refuses); answerable prompt → chosen = the gold answer, rejected =
  a refusal. Sigmoid DPO (Rafailov et al. 2023) with the fine-tuned model as the frozen
  reference (its log-probabilities precomputed once), plus `rpo_alpha` × the chosen
  responses' token NLL (TRL's `loss_type=["sigmoid", "sft"]`).

Both trainers get the project's own encoding (`hcnr_core.data.encode_sample`: the prompt
masked, response + EOS scored) as pre-tokenised rows — `input_ids` + `completion_mask` for
`SFTTrainer`, `prompt_ids`/`chosen_ids`/`rejected_ids` for `DPOTrainer`, whose
`_prepare_dataset` (it would re-tokenise text) returns them as they are — so training,
repair and evaluation never disagree about a prompt's tokens. A pair shares one prompt:
when `max_seq_len` truncates prompts, both sides keep the shorter (left-truncated) one.
The step count is `config.total_steps` (`steps`, or `epochs` over the data) as
`max_steps`; the optimizer is AdamW over the LoRA with the linear warm-up/decay of
`lr_factor` as a `LambdaLR`; a `TrainerCallback` ticks progress and raises
`RepairCancelled` between optimizer steps, records the logged losses (and DPO's reward
margins/accuracies) and stops a diverged run. Two runs on one seed write identical tensors.

Why TRL, and with which settings. `bench/baseline_trainers.py` times one optimizer step
of each option on the same LoRA (r=8, all linear layers), data and encoding, float32, one
thread, on this 2-core machine shared with other jobs (median ms, steps 2..N):

                              toy (b=8)   organism (b=16)   SmolLM2-135M (b=4)
    RAIT hand-written loop       21             52               3048
    RAIT transformers Trainer    21             67               3092
    RAIT TRL SFTTrainer          26             74               3659
    DPO  hand-written loop       23             96               6975
    DPO  Trainer + DPO loss      22             86               6617
    DPO  TRL DPOTrainer          32            112               7734

- TRL costs 10-45% more per step than `Trainer`: the fused LM head TRL 1.16 always
  installs also computes each position's entropy and top-1 for its metrics, and without
  Triton (CPU) it scores every position, prompts included. On the organism's default
  run (60 steps) that is 0.4 s (RAIT) to 1.6 s (DPO); for it the baselines get the maintained
  trainers — DPO's losses, the reference pass, the reward metrics — instead of a third
  copy of a training loop (`hcnr_core/realmodel/train.py` is the second).
- What made TRL look unusable (`hcnr_core/realmodel/train.py` gave up on `SFTTrainer`
  when 4 SmolLM2 steps had not finished in 13 minutes, blaming the head) are two defaults
  of TRL's configs: `bf16=True` (bf16 autocast, emulated on these CPUs) and
  `gradient_checkpointing=True`. With them one `SFTTrainer` step takes 60.5 s on SmolLM2
  (16x) and 499 ms on the organism (7x) (`--trl-defaults`). `TRL_ARGS` turns both off;
  the compute dtype stays `config.dtype`.
- `datasets.Dataset.from_dict` works (datasets 5.2.0, pyarrow 26.0.1, dill 0.4.1, Python
  3.11.7): the `PicklingError: Can't pickle <class 'MonthDayNano'>` that once kept
  `DPOTrainer` from receiving its data, and made this module hand-write its DPO, no
  longer occurs.
- What changed numerically: batches come from `Trainer`'s seeded sampler, one epoch at a
  time (a batch no longer straddles two epochs); the RPO term is TRL's token mean over
  the batch's chosen responses, not a mean of per-response means; DPO keeps
  `lora_dropout` (`disable_dropout=False`). With the defaults, the organism tests
  (tests/test_baselines.py: refusal on unknowns up by >= 0.25, known questions refused
  <= 0.25 and answered >= 0.6) pass for both, as they did with the hand-written loops.

The output is the fine-tuned checkpoint with only the LoRA-target matrices replaced by
`W + B·A·alpha/r` (computed in float32, cast to the stored dtype); every other tensor is
copied bit for bit. `baseline_report.json` records the samples, pairs, trainable
parameters, the fraction of parameters that differ from the fine-tuned model, losses,
learning rates, per-stage seconds and the config.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from hcnr_core import __version__
from hcnr_core.card import CardInputs
from hcnr_core.checkpoint import (
    CheckpointInfo,
    DictSource,
    check_adapter_matches,
    check_full_compatible,
    compute_dtype,
    inspect_checkpoint,
    load_merged_adapter,
    load_model,
    load_tokenizer,
    resolve_adapter_base,
)
from hcnr_core.config import BaselineConfig, DpoConfig, RaitConfig, RunOptions
from hcnr_core.data import Sample, encode_sample, encode_samples, load_jsonl
from hcnr_core.errors import CheckpointError, DataValidationError, HCNRError, RepairCancelled
from hcnr_core.evaluation import GenerationSettings, RefusalDetector, generate
from hcnr_core.progress import ProgressEvent
from hcnr_core.report import versions
from hcnr_core.writer import CheckpointFiles, check_output_dir, sha256_file, write_checkpoint

REPORT_NAME = "baseline_report.json"


# --- configuration: RaitConfig and DpoConfig live in hcnr_core.config (torch-free) ------


# --- data ----------------------------------------------------------------------------------


def subsample(samples: Sequence[Sample], n: int | None, seed: int) -> list[Sample]:
    """A seeded subset of `n` samples, stratified by `answerable`, in file order."""
    if n is None or n >= len(samples):
        return list(samples)
    rng = random.Random(f"hcnr-baseline-subsample-{seed}")
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.answerable, []).append(i)
    picked: list[int] = []
    keys = sorted(groups, key=repr)
    # Largest-remainder apportionment so the subset keeps the classes' proportions.
    quotas = {k: n * len(groups[k]) / len(samples) for k in keys}
    counts = {k: int(quotas[k]) for k in keys}
    for k in sorted(keys, key=lambda k: quotas[k] - counts[k], reverse=True)[
        : n - sum(counts.values())
    ]:
        counts[k] += 1
    for k in keys:
        picked += rng.sample(groups[k], counts[k])
    return [samples[i] for i in sorted(picked)]


# --- DPO pairs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    messages: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    answerable: bool
    source: str  # "generated", "fallback" (the model already refused), "refusal"
    line: int = 0


def build_pairs(
    samples: Sequence[Sample],
    generated: Sequence[str | None],
    refusal: str,
    detector: RefusalDetector,
    seed: int,
) -> list[PreferencePair]:
    """IDK preference pairs; `generated[i]` is the model's answer to unanswerable sample i."""
    golds = [s.response for s in samples if s.answerable]
    rng = random.Random(f"hcnr-baseline-fallback-{seed}")
    pairs = []
    for s, answer in zip(samples, generated, strict=True):
        if s.answerable:
            pairs.append(PreferencePair(s.messages, s.response, refusal, True, "refusal", s.line))
            continue
        if answer and answer.strip() and not detector(answer):
            pairs.append(PreferencePair(s.messages, s.response, answer, False, "generated", s.line))
        elif golds:
            fallback = rng.choice(golds)
            pairs.append(
                PreferencePair(s.messages, s.response, fallback, False, "fallback", s.line)
            )
        # else: the model refuses and no gold-style answer exists; the sample has no pair
    return pairs


# --- shared machinery ----------------------------------------------------------------------


@dataclass
class _Loaded:
    base: CheckpointInfo | None
    finetuned: CheckpointInfo
    tokenizer: Any
    samples: list[Sample]
    inputs: dict[str, Any]
    warnings: list[str]


def _prepare(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: str | Path | None,
    config: BaselineConfig,
    need_answerable: bool,
) -> _Loaded:
    """Every check that needs no weights: output (when given), checkpoints, data."""
    if out is not None:
        check_output_dir(Path(out))
    ft_info = inspect_checkpoint(finetuned)
    base_info = inspect_checkpoint(base) if base is not None else None
    if base_info is not None and base_info.kind != "full":
        raise CheckpointError(f"{base}: the base must be a full model, not an adapter")
    notes: list[str] = []
    if ft_info.kind == "adapter":
        base_info = base_info or resolve_adapter_base(ft_info, None)
        check_adapter_matches(base_info, ft_info, check_name=config.check_adapter_base_name)
    elif base_info is not None:
        notes += check_full_compatible(base_info, ft_info)
    infos = [ft_info] if base_info is None else [ft_info, base_info]
    tokenizer = load_tokenizer(*infos)
    if isinstance(honesty, (str, Path)):
        path = Path(honesty)
        samples = load_jsonl(path)
        meta: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path)}
    else:
        samples, meta = list(honesty), {"path": None}
    source = meta["path"] or "honesty"
    if need_answerable:
        missing = [(s.line, "DPO needs 'answerable' on every sample") for s in samples]
        missing = [m for m, s in zip(missing, samples, strict=True) if s.answerable is None]
        if missing:
            raise DataValidationError(source, missing)
    meta["samples"] = len(samples)
    samples = subsample(samples, config.n_samples, config.seed)
    encode_samples(tokenizer, samples, config.max_seq_len, source)  # fail before weights
    inputs = {
        "base": None if base_info is None else str(base_info.path),
        "finetuned": str(ft_info.path),
        "finetuned_kind": ft_info.kind,
        "honesty": meta,
    }
    return _Loaded(base_info, ft_info, tokenizer, samples, inputs, notes)


def _compute_dtype(config: BaselineConfig, info: CheckpointInfo) -> torch.dtype:
    return compute_dtype(config.dtype, info)


def _load_finetuned(prep: _Loaded, config: BaselineConfig, device: str) -> tuple[Any, Any]:
    """The fine-tuned model (adapter merged) in the compute dtype, and its stored tensors."""
    if prep.finetuned.kind == "full":
        dtype = _compute_dtype(config, prep.finetuned)
        return load_model(prep.finetuned, dtype, device), prep.finetuned.source()
    assert prep.base is not None
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        merged = load_merged_adapter(prep.base, prep.finetuned)
    state = merged.state_dict()
    # Stored-dtype CPU tensors, taken before `.to()` gives the model new ones.
    source = DictSource({k: state[k] for k in prep.base.source().keys()})
    return merged.to(dtype=_compute_dtype(config, prep.base), device=device), source


def _attach_lora(model: Any, config: BaselineConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # LoRA A is initialised from torch's generator
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, lora)
    except ValueError as exc:
        raise CheckpointError(f"lora_targets {config.lora_targets!r}: {exc}") from exc


def _lora_layers(peft_model: Any) -> dict[str, Any]:
    """Weight name in the checkpoint -> the peft LoRA layer that wraps it."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model.") + ".weight": module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block, then restored."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Stage -> its share of a run's progress bar (the overall `ProgressEvent.fraction`).
STAGES: dict[str, dict[str, float]] = {
    "rait": {"load": 0.05, "train": 0.8, "merge": 0.05, "save": 0.1},
    "dpo": {
        "load": 0.05,
        "generate_rejected": 0.1,
        "reference": 0.05,
        "train": 0.65,
        "merge": 0.05,
        "save": 0.1,
    },
}


class _Run:
    """Stage timing, progress (`ProgressEvent`s, like every method's) and cancellation
    for one baseline run."""

    def __init__(
        self,
        method: Literal["rait", "dpo"],
        progress: Callable[[ProgressEvent], None] | None,
        should_cancel: Callable[[], bool] | None,
    ):
        self.progress, self.should_cancel = progress, should_cancel
        self.stages = STAGES[method]
        self.seconds: dict[str, float] = {}
        self.stage, self._started = "", 0.0

    def enter(self, stage: str) -> None:
        self.stage, self._started = stage, time.perf_counter()
        self.tick(0, 1)

    def leave(self) -> None:
        self.seconds[self.stage] = round(time.perf_counter() - self._started, 4)
        self.tick(1, 1)

    def finished(self) -> None:
        """The last stage is complete (published: too late to cancel)."""
        self._emit(1, 1)

    def tick(self, done: int, total: int) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise RepairCancelled(f"cancelled during {self.stage}")
        self._emit(done, total)

    def _emit(self, done: int, total: int) -> None:
        if self.progress is None:
            return
        order = list(self.stages)
        before = sum(self.stages[s] for s in order[: order.index(self.stage)])
        share = self.stages[self.stage] * (done / total if total else 1.0)
        self.progress(ProgressEvent(self.stage, done, total, min(1.0, before + share)))


# --- training on TRL's trainers ----------------------------------------------------------

# TRL's configs default to bf16 autocast and gradient checkpointing: on CPU that is 7-16x
# slower per step (module docstring); the compute dtype is `config.dtype`, as it was.
TRL_ARGS: dict[str, Any] = {"bf16": False, "gradient_checkpointing": False}


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over `warmup`·steps, then linear decay to 10% of the peak."""
    warm = int(steps * warmup)
    if step < warm:
        return (step + 1) / (warm + 1)
    return 1.0 - 0.9 * (step - warm) / max(1, steps - warm)


def _training_args(
    cls: Any, config: BaselineConfig, device: str, steps: int, scratch: str, **extra: Any
):
    """`cls` (SFTConfig, DPOConfig) for `steps` optimizer steps of the baseline's config."""
    return cls(
        output_dir=scratch,
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        max_grad_norm=1.0,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device == "cpu",
        logging_steps=1,
        logging_nan_inf_filter=False,  # a diverged loss must reach the callback
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **TRL_ARGS,
        **extra,
    )


def _optimizers(model: Any, config: BaselineConfig, steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) parameters and the `lr_factor` schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda step: lr_factor(step, steps, config.warmup)
    )
    return optim, schedule


def _callback(run: _Run, keys: dict[str, str]) -> tuple[Any, dict[str, list[float]]]:
    """A TrainerCallback that ticks `run` after every optimizer step (progress, and
    `RepairCancelled` between steps), keeps the logged `keys` (report name -> log name)
    and raises `HCNRError` when the loss is not finite."""
    from transformers import TrainerCallback

    kept: dict[str, list[float]] = {name: [] for name in keys}

    class Steps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            run.tick(state.global_step, state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary
            if not math.isfinite(logs["loss"]):
                raise HCNRError(f"training diverged: loss {logs['loss']}; lower lr")
            for name, key in keys.items():
                value = float(logs[key])
                kept[name].append(value if key == "learning_rate" else round(value, 6))

    return Steps(), kept


@contextmanager
def _trainer_context(device: str) -> Iterator[str]:
    """A scratch output_dir; no progress bars or log lines from datasets, TRL or the
    Trainer (ours are the progress); `cuda:N` as the current CUDA device, since the
    Trainer places the model on `cuda`."""
    import datasets

    with ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="hcnr-baseline-"))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # v5 deprecations, TRL's advisories
        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            stack.callback(datasets.enable_progress_bars)
        if "TQDM_DISABLE" not in os.environ:  # TRL's reference pass reads only this
            os.environ["TQDM_DISABLE"] = "1"
            stack.callback(os.environ.pop, "TQDM_DISABLE", None)
        if device.startswith("cuda:"):
            stack.enter_context(torch.cuda.device(int(device[5:])))
        yield scratch


def _train(trainer: Any) -> None:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the callback's progress replaces its lines
    trainer.train()
    trainer.model.eval()


def _merge_and_write(
    method: str,
    prep: _Loaded,
    peft_model: Any,
    ft_source: Any,
    out: Path,
    report: dict[str, Any],
    run: _Run,
) -> dict[str, Any]:
    """Merge W + ΔW per LoRA layer (float32, then the stored dtype) and publish `out`."""
    run.enter("merge")
    merged: dict[str, torch.Tensor] = {}
    changed = 0
    with torch.no_grad():
        for name, layer in _lora_layers(peft_model).items():
            if name not in ft_source:
                continue
            original = ft_source.get(name)
            delta = layer.get_delta_weight("default").float().cpu()
            new = (original.float() + delta).to(original.dtype)
            if not torch.isfinite(new).all():
                raise HCNRError(f"{name}: the merged weights are not finite")
            changed += int((new != original).sum())
            merged[name] = new
    total = sum(math.prod(ft_source.shape(k)) for k in ft_source.keys())
    target = sum(math.prod(ft_source.shape(k)) for k in merged)
    run.leave()

    run.enter("save")
    report.update(
        {
            "lora_target_matrices": len(merged),
            "total_params": total,
            "target_params": target,
            "changed_params": changed,
            "fraction_model_params_changed": changed / total if total else 0.0,
            "fraction_target_params_changed": changed / target if target else 0.0,
        }
    )
    sizes = {
        k: math.prod(ft_source.shape(k)) * ft_source.dtype(k).itemsize for k in ft_source.keys()
    }
    ft = prep.finetuned
    model_dir = ft.path if ft.kind == "full" or prep.base is None else prep.base.path
    token_dir = ft.path if ft.has_tokenizer or prep.base is None else prep.base.path
    generation_dirs = [ft.path] if prep.base is None else [ft.path, prep.base.path]

    def timed(report: dict[str, Any]) -> None:
        run.seconds["save"] = round(time.perf_counter() - run._started, 4)
        report["stage_seconds"] = dict(run.seconds)
        report["seconds_total"] = round(sum(run.seconds.values()), 4)

    write_checkpoint(
        out,
        sizes,
        lambda k: merged[k] if k in merged else ft_source.get(k),
        CheckpointFiles(model_dir, generation_dirs, token_dir),
        CardInputs.of_report(method, report),
        report,
        REPORT_NAME,
        before_report=timed,
    )
    run.finished()
    return report


def _report_head(
    method: str, prep: _Loaded, config: BaselineConfig, options: RunOptions, trainable: int
) -> dict:
    return {
        "format_version": 1,
        "method": method,
        "hcnr_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": prep.inputs,
        "config": options.recorded(config),
        "samples_used": len(prep.samples),
        "n_answerable": sum(bool(s.answerable) for s in prep.samples),
        "n_unanswerable": sum(s.answerable is False for s in prep.samples),
        "trainable_params": trainable,
        "warnings": prep.warnings,
        "versions": versions(),
    }


def check_baseline(
    method: Literal["rait", "dpo"],
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    config: BaselineConfig,
) -> list[str]:
    """What `train_rait`/`train_dpo` check before loading weights (checkpoints' safety and
    compatibility, the data, DPO's `answerable` labels), with no output; returns warnings."""
    return _prepare(
        base, finetuned, honesty, None, config, need_answerable=method == "dpo"
    ).warnings


# --- RAIT ----------------------------------------------------------------------------------


def train_rait(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: str | Path,
    config: RaitConfig | None = None,
    *,
    options: RunOptions | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    columns: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """SFT a LoRA on the honesty set, merge it and publish the checkpoint at `out`.

    `columns` (weight name -> input columns, e.g. `restored_columns(hcnr_report)`)
    confines the update to those columns of those matrices: the LoRA wraps only the named
    matrices and its A is zero outside their columns, at initialisation and in every
    gradient, so ΔW = B·(A⊙M) is zero in every other column. AdamW moves a parameter whose
    gradient and moments are zero by exactly zero (and weight decay keeps zero at zero)."""
    config = config or RaitConfig()
    options = (options or RunOptions()).check_for(RaitConfig)
    run = _Run("rait", progress, should_cancel)
    with _torch_threads(options.threads):
        return _rait(base, finetuned, honesty, Path(out), config, options, run, columns)


def restored_columns(report: str | Path | Mapping[str, Any]) -> dict[str, list[int]]:
    """Weight name -> the input columns an HCNR repair restored (its `hcnr_report.json`)."""
    if not isinstance(report, Mapping):
        report = json.loads(Path(report).read_text(encoding="utf-8"))
    return {m["name"]: list(m["columns"]) for m in report["selected_matrices"] if m["columns"]}


def _confine_to_columns(peft_model: Any, columns: Mapping[str, Sequence[int]]) -> None:
    """Zero each LoRA A outside its matrix's `columns` and keep its gradient zero there."""
    layers = _lora_layers(peft_model)
    missing = sorted(set(columns) - set(layers))
    if missing:
        raise CheckpointError(f"no LoRA layer wraps {missing[:3]} (columns of unknown matrices)")
    for name, layer in layers.items():
        weight = layer.lora_A["default"].weight  # (r, in)
        mask = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
        mask[torch.as_tensor(list(columns[name]), dtype=torch.long)] = 1
        with torch.no_grad():
            weight.mul_(mask)
        weight.register_hook(lambda grad, mask=mask: grad * mask)


def _rait(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: Path,
    config: RaitConfig,
    options: RunOptions,
    run: _Run,
    columns: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    if columns is not None:
        if not columns:
            raise HCNRError("columns: no matrix has columns to train")
        # peft full-matches a regex string against module names: exactly these matrices.
        names = "|".join(re.escape(w.removesuffix(".weight")) for w in sorted(columns))
        config = config.model_copy(update={"lora_targets": f"^(?:{names})$"})
    prep = _prepare(base, finetuned, honesty, out, config, need_answerable=False)
    from datasets import Dataset  # after the checks: a bad input fails without importing TRL
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(config.seed)

    run.enter("load")
    model, ft_source = _load_finetuned(prep, config, options.device)
    encoded = encode_samples(prep.tokenizer, prep.samples, config.max_seq_len)
    model = _attach_lora(model, config)
    if columns is not None:
        _confine_to_columns(model, columns)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run.leave()

    run.enter("train")
    steps = config.total_steps(len(encoded))
    callback, logged = _callback(run, {"losses": "loss", "learning_rates": "learning_rate"})
    rows = Dataset.from_dict(
        {
            "input_ids": [s.input_ids for s in encoded],
            "completion_mask": [[0] * s.prompt_len + [1] * s.response_len for s in encoded],
        }
    )
    with _trainer_context(options.device) as scratch:
        args = _training_args(
            SFTConfig,
            config,
            options.device,
            steps,
            scratch,
            max_length=None,
            completion_only_loss=True,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            processing_class=prep.tokenizer,
            callbacks=[callback],
            optimizers=_optimizers(model, config, steps),
        )
        _train(trainer)
    run.leave()

    report = _report_head("rait", prep, config, options, trainable)
    report.update({"steps": steps, **logged})
    if columns is not None:
        report["confined_to_columns"] = {
            "matrices": len(columns),
            "columns": sum(len(c) for c in columns.values()),
        }
    return _merge_and_write("rait", prep, model, ft_source, out, report, run)


# --- DPO -----------------------------------------------------------------------------------


def encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_seq_len: int
) -> dict[str, list[list[int]]]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` of every pair, each side encoded like a
    sample (`encode_sample`); the pair keeps the shorter of its two left-truncated prompts."""
    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    problems = []
    for p in pairs:
        try:
            chosen, rejected = (
                encode_sample(tokenizer, Sample(p.messages, text, line=p.line), max_seq_len)
                for text in (p.chosen, p.rejected)
            )
        except DataValidationError as exc:
            problems += exc.problems
            continue
        prompt = min(chosen, rejected, key=lambda e: e.prompt_len)
        rows["prompt_ids"].append(prompt.input_ids[: prompt.prompt_len])
        rows["chosen_ids"].append(chosen.input_ids[chosen.prompt_len :])
        rows["rejected_ids"].append(rejected.input_ids[rejected.prompt_len :])
    if problems:
        raise DataValidationError("<preference pairs>", problems)
    return rows


def _dpo_trainer() -> Any:
    """TRL's DPOTrainer fed pre-tokenised pairs: its `_prepare_dataset` (which would
    re-tokenise prompt and response text together) returns them as they are."""
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    return PreTokenizedDPOTrainer


def train_dpo(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: str | Path,
    config: DpoConfig | None = None,
    *,
    options: RunOptions | None = None,
    detector: RefusalDetector | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """DPO of a LoRA on IDK preference pairs, merged and published at `out`."""
    config = config or DpoConfig()
    options = (options or RunOptions()).check_for(DpoConfig)
    detector = detector or RefusalDetector()
    with _torch_threads(options.threads):
        run = _Run("dpo", progress, should_cancel)
        return _dpo(base, finetuned, honesty, Path(out), config, options, detector, run)


def _dpo(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: Path,
    config: DpoConfig,
    options: RunOptions,
    detector: RefusalDetector,
    run: _Run,
) -> dict[str, Any]:
    prep = _prepare(base, finetuned, honesty, out, config, need_answerable=True)
    from datasets import Dataset  # after the checks: a bad input fails without importing TRL
    from trl import DPOConfig

    torch.manual_seed(config.seed)

    run.enter("load")
    model, ft_source = _load_finetuned(prep, config, options.device)
    run.leave()

    run.enter("generate_rejected")
    unanswerable = [i for i, s in enumerate(prep.samples) if s.answerable is False]
    settings = GenerationSettings(
        config.generation_batch_size, config.max_new_tokens, config.max_seq_len
    )
    answers = generate(
        model, prep.tokenizer, [prep.samples[i].messages for i in unanswerable], settings
    )
    generated: list[str | None] = [None] * len(prep.samples)
    for i, answer in zip(unanswerable, answers, strict=True):
        generated[i] = answer
    refusals = Counter(s.response for s in prep.samples if s.answerable is False)
    refusal = config.refusal or (refusals.most_common(1)[0][0] if refusals else "I don't know.")
    pairs = build_pairs(prep.samples, generated, refusal, detector, config.seed)
    if not pairs:
        raise DataValidationError(
            prep.inputs["honesty"]["path"] or "honesty",
            [
                (
                    0,
                    "no preference pairs: the model already refuses every unanswerable prompt "
                    "and there is no answerable sample to take a rejected answer from",
                )
            ],
        )
    encoded = encode_pairs(prep.tokenizer, pairs, config.max_seq_len)
    run.leave()

    run.enter("reference")  # LoRA attached, the reference log-probabilities precomputed
    model = _attach_lora(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = config.total_steps(len(pairs))
    callback, logged = _callback(
        run,
        {
            "losses": "loss",
            "reward_margins": "rewards/margins",
            "reward_accuracies": "rewards/accuracies",
            "learning_rates": "learning_rate",
        },
    )
    rpo = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, config.rpo_alpha]}
    with _trainer_context(options.device) as scratch:
        args = _training_args(
            DPOConfig,
            config,
            options.device,
            steps,
            scratch,
            beta=config.beta,
            max_length=None,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=config.batch_size,
            disable_dropout=False,  # lora_dropout means what it says
            **(rpo if config.rpo_alpha else {"loss_type": ["sigmoid"]}),
        )
        trainer = _dpo_trainer()(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict(encoded),
            processing_class=prep.tokenizer,
            callbacks=[callback],
            optimizers=_optimizers(model, config, steps),
        )
        run.leave()

        run.enter("train")
        _train(trainer)
    run.leave()

    report = _report_head("dpo", prep, config, options, trainable)
    report.update(
        {
            "steps": steps,
            "n_pairs": len(pairs),
            "pairs": dict(Counter(p.source for p in pairs)),
            "dropped_samples": len(prep.samples) - len(pairs),
            "refusal_response": refusal,
            "rejected_examples": [p.rejected for p in pairs if p.source == "generated"][:5],
            **logged,
        }
    )
    return _merge_and_write("dpo", prep, model, ft_source, out, report, run)
