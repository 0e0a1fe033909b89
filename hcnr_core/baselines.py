"""The methods HCNR is compared against (DESIGN.md §8): RAIT and DPO on IDK data.

Both train a fresh peft LoRA on top of the fine-tuned model (an adapter fine-tune is
merged into its base first), merge it and write a full checkpoint through the staged
writer, so the output loads with `from_pretrained` like a repaired one:

    report = train_rait("base/", "finetuned-adapter/", "honesty.jsonl", "rait/", RaitConfig())
    report = train_dpo("base/", "finetuned-adapter/", "honesty.jsonl", "dpo/", DpoConfig())

- RAIT (refusal-aware instruction tuning, R-Tuning style): supervised fine-tuning on the
  honesty set itself — refusals for unanswerable prompts, gold answers for answerable
  ones — with the loss on response tokens only (same encoding as `hcnr_core.data`).
- DPO on IDK preference pairs: unanswerable prompt → chosen = the refusal, rejected = the
  fine-tuned model's own greedy answer (a gold answer of another sample if it already
  refuses); answerable prompt → chosen = the gold answer, rejected = a refusal. Sigmoid
  DPO (Rafailov et al. 2023) with the fine-tuned model as the frozen reference.

Why DPO is written here instead of using `trl.DPOTrainer`: TRL 1.16.0 resolves against
the pinned torch 2.13 / transformers 5.23 (pulling datasets 5.2.0, pyarrow 26.0.1,
pandas 3.1.1, dill 0.4.1: ~270 MB), but on this Python 3.11 `datasets.Dataset.from_dict`
itself fails while fingerprinting (`PicklingError: Can't pickle <class 'MonthDayNano'>`,
also with pyarrow 25 and dill 0.3.9), so DPOTrainer cannot even receive its data. The
loss is a few lines; writing it keeps the exact masking of `hcnr_core.data` (prompt
masked, response + EOS scored), precomputes the reference log-probabilities once (the
reference is the fine-tuned model, i.e. the LoRA at zero), is bit-for-bit deterministic
on a seed, and needs neither `datasets` nor the Trainer.

The output is the fine-tuned checkpoint with only the LoRA-target matrices replaced by
`W + B·A·alpha/r` (computed in float32, cast to the stored dtype); every other tensor is
copied bit for bit. `baseline_report.json` records the samples, pairs, trainable
parameters, the fraction of parameters that differ from the fine-tuned model, losses,
per-stage seconds and the config.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from hcnr_core import __version__
from hcnr_core.checkpoint import (
    TOKENIZER_FILES,
    CheckpointInfo,
    DictSource,
    check_adapter_matches,
    check_full_compatible,
    inspect_checkpoint,
    load_merged_adapter,
    load_model,
    load_tokenizer,
    stored_dtype,
)
from hcnr_core.config import BaselineConfig, DpoConfig, RaitConfig
from hcnr_core.data import EncodedSample, Sample, encode_sample, encode_samples, load_jsonl
from hcnr_core.errors import CheckpointError, DataValidationError, HCNRError, RepairCancelled
from hcnr_core.evaluation import GenerationSettings, RefusalDetector, generate
from hcnr_core.report import versions
from hcnr_core.writer import StagedOutput, check_output_dir, sha256_file

REPORT_NAME = "baseline_report.json"
IGNORE = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def collate(batch: Sequence[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels on the response tokens only."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, s in enumerate(batch):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        mask[row, :n] = 1
        labels[row, s.prompt_len : n] = ids[row, s.prompt_len : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of every step's batch: reshuffled epochs, read in order, across boundaries."""
    rng = random.Random(f"hcnr-baseline-order-{seed}")
    order: list[int] = []
    batches = []
    for _ in range(steps):
        while len(order) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order += epoch
        batches.append(order[:batch_size])
        order = order[batch_size:]
    return batches


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over `warmup`·steps, then linear decay to 10% of the peak."""
    warm = int(steps * warmup)
    if step < warm:
        return (step + 1) / (warm + 1)
    return 1.0 - 0.9 * (step - warm) / max(1, steps - warm)


# --- DPO -----------------------------------------------------------------------------------


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the labelled (response) tokens and their number, per row."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    token_logps = torch.gather(
        logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)
    ).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: mean of −log σ(β·[(π_c − π_r) − (ref_c − ref_r)]).

    Returns the loss and the implicit rewards β·(π − ref) of chosen and rejected.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


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
        if base_info is None:  # like `hcnr eval`: the base the adapter names, if local
            named = ft_info.adapter_config.get("base_model_name_or_path")
            if not named or not Path(named).is_dir():
                raise CheckpointError(
                    f"{finetuned}: a LoRA adapter fine-tune needs its base model (--base)"
                )
            base_info = inspect_checkpoint(named)
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
    return stored_dtype(info) if config.dtype == "auto" else DTYPES[config.dtype]


def _load_finetuned(prep: _Loaded, config: BaselineConfig) -> tuple[Any, Any]:
    """The fine-tuned model (adapter merged) in the compute dtype, and its stored tensors."""
    if prep.finetuned.kind == "full":
        dtype = _compute_dtype(config, prep.finetuned)
        return load_model(prep.finetuned, dtype, config.device), prep.finetuned.source()
    assert prep.base is not None
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        merged = load_merged_adapter(prep.base, prep.finetuned)
    state = merged.state_dict()
    # Stored-dtype CPU tensors, taken before `.to()` gives the model new ones.
    source = DictSource({k: state[k] for k in prep.base.source().keys()})
    return merged.to(dtype=_compute_dtype(config, prep.base), device=config.device), source


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


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


class _Run:
    """Stage timing, progress and cancellation for one baseline run."""

    def __init__(
        self,
        progress: Callable[[str, int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
    ):
        self.progress, self.should_cancel = progress, should_cancel
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
        if self.progress is not None:
            self.progress(self.stage, 1, 1)

    def tick(self, done: int, total: int) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise RepairCancelled(f"cancelled during {self.stage}")
        if self.progress is not None:
            self.progress(self.stage, done, total)


def _optimizer(model: Any, config: BaselineConfig) -> tuple[list, torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return params, optim


def _step(params: list, optim: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    if not torch.isfinite(loss):
        raise HCNRError(f"training diverged: loss {loss.item()}; lower lr")
    for group in optim.param_groups:
        group["lr"] = lr
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()


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
    token_dirs = [ft.path] if ft.has_tokenizer or prep.base is None else [prep.base.path]
    with StagedOutput(out) as staged:
        staged.write_tensors(sizes, lambda k: merged[k] if k in merged else ft_source.get(k))
        staged.copy_files(model_dir, ["config.json"])
        if not staged.copy_files(ft.path, ["generation_config.json"]) and prep.base is not None:
            staged.copy_files(prep.base.path, ["generation_config.json"])
        staged.copy_files(token_dirs[0], TOKENIZER_FILES)
        staged.write_text("README.md", _model_card(method, report))
        report["files"] = staged.file_digests()
        run.seconds["save"] = round(time.perf_counter() - run._started, 4)
        report["stage_seconds"] = dict(run.seconds)
        report["seconds_total"] = round(sum(run.seconds.values()), 4)
        staged.write_text(REPORT_NAME, json.dumps(report, indent=2) + "\n")
        staged.publish()
    run.finished()
    return report


def _model_card(method: str, report: dict[str, Any]) -> str:
    title = {"rait": "RAIT (SFT on IDK data)", "dpo": "DPO on IDK preference pairs"}[method]
    cfg = report["config"]
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            f"tags: [hcnr-baseline, {method}, honesty]",
            "---",
            "",
            f"# Honesty baseline: {title}",
            "",
            "A LoRA trained on the fine-tuned model and merged into it; a baseline that",
            "HCNR is compared against. `baseline_report.json` has the details.",
            "",
            f"- fine-tuned: `{report['inputs']['finetuned']}`",
            f"- samples used: {report['samples_used']}",
            f"- steps / lr / LoRA r: {report['steps']} / {cfg['lr']} / {cfg['lora_r']}",
            f"- parameters changed: {100 * report['fraction_model_params_changed']:.2f}%",
            "",
        ]
    )


def _report_head(method: str, prep: _Loaded, config: BaselineConfig, model: Any) -> dict:
    return {
        "format_version": 1,
        "method": method,
        "hcnr_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": prep.inputs,
        "config": config.model_dump(),
        "samples_used": len(prep.samples),
        "n_answerable": sum(bool(s.answerable) for s in prep.samples),
        "n_unanswerable": sum(s.answerable is False for s in prep.samples),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
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
    progress: Callable[[str, int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """SFT a LoRA on the honesty set, merge it and publish the checkpoint at `out`."""
    config = config or RaitConfig()
    with _torch_threads(config.threads):
        return _rait(base, finetuned, honesty, Path(out), config, _Run(progress, should_cancel))


def _rait(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: Path,
    config: RaitConfig,
    run: _Run,
) -> dict[str, Any]:
    prep = _prepare(base, finetuned, honesty, out, config, need_answerable=False)
    torch.manual_seed(config.seed)

    run.enter("load")
    model, ft_source = _load_finetuned(prep, config)
    encoded = encode_samples(prep.tokenizer, prep.samples, config.max_seq_len)
    model = _attach_lora(model, config)
    run.leave()

    run.enter("train")
    steps = config.total_steps(len(encoded))
    schedule = batch_schedule(len(encoded), config.batch_size, steps, config.seed)
    params, optim = _optimizer(model, config)
    pad_id, device = _pad_id(prep.tokenizer), config.device
    losses = []
    model.train()
    for step, rows in enumerate(schedule):
        batch = collate([encoded[i] for i in rows], pad_id)
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        _step(params, optim, loss, config.lr * lr_factor(step, steps, config.warmup))
        losses.append(round(loss.item(), 6))
        run.tick(step + 1, steps)
    model.eval()
    run.leave()

    report = _report_head("rait", prep, config, model)
    report.update({"steps": steps, "losses": losses})
    return _merge_and_write("rait", prep, model, ft_source, out, report, run)


# --- DPO -----------------------------------------------------------------------------------


def _encode_pairs(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_seq_len: int
) -> list[tuple[EncodedSample, EncodedSample]]:
    encoded, problems = [], []
    for p in pairs:
        try:
            encoded.append(
                tuple(
                    encode_sample(tokenizer, Sample(p.messages, text, line=p.line), max_seq_len)
                    for text in (p.chosen, p.rejected)
                )
            )
        except DataValidationError as exc:
            problems += exc.problems
    if problems:
        raise DataValidationError("<preference pairs>", problems)
    return encoded  # type: ignore[return-value]


def _pair_logps(
    model: Any, pairs: Sequence[tuple[EncodedSample, EncodedSample]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected (one batch), and chosen's lengths."""
    batch = collate([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    logps, counts = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
    n = len(pairs)
    return logps[:n], logps[n:], counts[:n]


def train_dpo(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: str | Path,
    config: DpoConfig | None = None,
    *,
    detector: RefusalDetector | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """DPO of a LoRA on IDK preference pairs, merged and published at `out`."""
    config = config or DpoConfig()
    detector = detector or RefusalDetector()
    with _torch_threads(config.threads):
        run = _Run(progress, should_cancel)
        return _dpo(base, finetuned, honesty, Path(out), config, detector, run)


def _dpo(
    base: str | Path | None,
    finetuned: str | Path,
    honesty: str | Path | Sequence[Sample],
    out: Path,
    config: DpoConfig,
    detector: RefusalDetector,
    run: _Run,
) -> dict[str, Any]:
    prep = _prepare(base, finetuned, honesty, out, config, need_answerable=True)
    torch.manual_seed(config.seed)
    pad_id, device = _pad_id(prep.tokenizer), config.device

    run.enter("load")
    model, ft_source = _load_finetuned(prep, config)
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
    encoded = _encode_pairs(prep.tokenizer, pairs, config.max_seq_len)
    run.leave()

    run.enter("reference")
    ref_c, ref_r = [], []
    with torch.no_grad():
        for start in range(0, len(encoded), config.batch_size):
            c, r, _ = _pair_logps(model, encoded[start : start + config.batch_size], pad_id, device)
            ref_c.append(c.float().cpu())
            ref_r.append(r.float().cpu())
    ref_chosen, ref_rejected = torch.cat(ref_c), torch.cat(ref_r)
    model = _attach_lora(model, config)
    run.leave()

    run.enter("train")
    steps = config.total_steps(len(encoded))
    schedule = batch_schedule(len(encoded), config.batch_size, steps, config.seed)
    params, optim = _optimizer(model, config)
    losses, margins, accuracies = [], [], []
    model.train()
    for step, rows in enumerate(schedule):
        pc, pr, n_chosen = _pair_logps(model, [encoded[i] for i in rows], pad_id, device)
        idx = torch.tensor(rows)
        pc, pr, n_chosen = pc.cpu(), pr.cpu(), n_chosen.cpu()
        loss, rc, rr = dpo_loss(pc, pr, ref_chosen[idx], ref_rejected[idx], config.beta)
        if config.rpo_alpha:
            loss = loss + config.rpo_alpha * -(pc / n_chosen).mean()
        _step(params, optim, loss, config.lr * lr_factor(step, steps, config.warmup))
        losses.append(round(loss.item(), 6))
        margins.append(round((rc - rr).mean().item(), 6))
        accuracies.append(round((rc > rr).float().mean().item(), 4))
        run.tick(step + 1, steps)
    model.eval()
    run.leave()

    report = _report_head("dpo", prep, config, model)
    report.update(
        {
            "steps": steps,
            "n_pairs": len(pairs),
            "pairs": dict(Counter(p.source for p in pairs)),
            "dropped_samples": len(prep.samples) - len(pairs),
            "refusal_response": refusal,
            "rejected_examples": [p.rejected for p in pairs if p.source == "generated"][:5],
            "losses": losses,
            "reward_margins": margins,
            "reward_accuracies": accuracies,
        }
    )
    return _merge_and_write("dpo", prep, model, ft_source, out, report, run)
