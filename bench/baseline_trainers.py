"""Seconds per optimizer step of the baselines' training options (hcnr_core.baselines).

    .venv/bin/python -m bench.baseline_trainers [--model toy|organism|smollm2] [--steps 6]

Times, on the same LoRA, data and encoding (`hcnr_core.data.encode_sample`: prompt masked,
response + EOS scored), one optimizer step of:

- RAIT: a hand-written loop (what `baselines.py` had), transformers' `Trainer` with the
  project's collator, and TRL's `SFTTrainer` given pre-tokenised rows with a completion mask;
- DPO: a hand-written loop, `Trainer` with a sigmoid-DPO `compute_loss`, and TRL's
  `DPOTrainer` given pre-tokenised pairs (its `_prepare_dataset` returns them as they are)
  with `precompute_ref_log_probs`.

Prints the median seconds of steps 2..N (the first step warms up) and the seconds spent
building each trainer (TRL's dataset preparation and reference pass happen there).
`--model smollm2` uses the imported SmolLM2-135M (49k-token vocabulary) with 16 SelfAware
rows, batch 4; the tiny models use their honesty sets, batch 16 (toy: 8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

from hcnr_core.batching import collate  # noqa: E402
from hcnr_core.data import Sample, encode_sample, load_jsonl  # noqa: E402

# TRL's configs default to bf16 autocast and gradient checkpointing; --trl-defaults keeps them.
TRL_FIXES: dict[str, Any] = {"bf16": False, "gradient_checkpointing": False}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(model: str, workdir: Path) -> tuple[Path, list[Sample], int]:
    if model == "toy":
        from hcnr_core.toy import build_toy

        toy = build_toy(workdir / "toy", seed=0)
        return toy["full"], load_jsonl(toy["honesty"]), 8
    if model == "organism":
        from hcnr_core.organism import build_organism

        cache = ROOT / ".pytest_cache" / "d" / "hcnr-organism" / "tiny-0"
        org = build_organism(cache, size="tiny", seed=0)
        merged = workdir / "organism-merged"
        if not merged.exists():  # the fine-tune is an adapter: merge it once
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            base = AutoModelForCausalLM.from_pretrained(org["base"])
            PeftModel.from_pretrained(base, org["adapter"]).merge_and_unload().save_pretrained(
                merged
            )
            AutoTokenizer.from_pretrained(org["adapter"]).save_pretrained(merged)
        return merged, load_jsonl(org["honesty"]), 16
    from hcnr_core.data import parse_sample
    from hcnr_core.realmodel.data import load_selfaware, make_datasets
    from hcnr_core.realmodels import cached_hf_model

    rows = make_datasets(load_selfaware(ROOT.parent / "shared" / "datasets" / "selfaware"), 0)
    return cached_hf_model("smollm2-135m"), [parse_sample(r) for r in rows["align"][:16]], 4


def fresh(source: Path) -> tuple[Any, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
        return get_peft_model(model, lora), tokenizer


def seq_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logps = logits[:, :-1].float().log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(-1))
    return (logps.squeeze(-1) * (labels != -100)).sum(-1)


class Timer:
    """A TrainerCallback (built lazily) that records each optimizer step's seconds."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        times: list[float] = []
        self.times = times

        class _CB(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                self.t = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                times.append(time.perf_counter() - self.t)

        self.callback = _CB()


def args_for(cls: Any, scratch: str, steps: int, batch: int, **extra: Any) -> Any:
    return cls(
        output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=1, seed=0, dataloader_num_workers=0, **extra,
    )  # fmt: skip


def median(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


# --- RAIT --------------------------------------------------------------------------------


def rait_hand(source: Path, samples: list[Sample], steps: int, batch: int) -> tuple[float, float]:
    model, tokenizer = fresh(source)
    encoded = [encode_sample(tokenizer, s, 512) for s in samples]
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-3)
    times = []
    model.train()
    for step in range(steps):
        rows = [encoded[(step * batch + i) % len(encoded)] for i in range(batch)]
        started = time.perf_counter()
        loss = model(**collate(rows, tokenizer.eos_token_id)).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        times.append(time.perf_counter() - started)
    return median(times), 0.0


def rait_trainer(
    source: Path, samples: list[Sample], steps: int, batch: int
) -> tuple[float, float]:
    from transformers import Trainer, TrainingArguments

    model, tokenizer = fresh(source)
    encoded = [encode_sample(tokenizer, s, 512) for s in samples]
    timer = Timer()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        trainer = Trainer(
            model=model,
            args=args_for(TrainingArguments, scratch, steps, batch, remove_unused_columns=False),
            train_dataset=encoded,
            data_collator=lambda rows: collate(rows, tokenizer.eos_token_id),
            callbacks=[timer.callback],
        )
        built = time.perf_counter() - started
        trainer.train()
    return median(timer.times), built


def rait_sft(source: Path, samples: list[Sample], steps: int, batch: int) -> tuple[float, float]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = fresh(source)
    encoded = [encode_sample(tokenizer, s, 512) for s in samples]
    timer = Timer()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        data = Dataset.from_dict(
            {
                "input_ids": [s.input_ids for s in encoded],
                "completion_mask": [[0] * s.prompt_len + [1] * s.response_len for s in encoded],
            }
        )
        trainer = SFTTrainer(
            model=model,
            args=args_for(SFTConfig, scratch, steps, batch, max_length=None, **TRL_FIXES),
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )
        built = time.perf_counter() - started
        trainer.train()
    return median(timer.times), built


# --- DPO ---------------------------------------------------------------------------------


def pairs_of(tokenizer: Any, samples: list[Sample]) -> list[tuple[Any, Any]]:
    """chosen = the sample's response, rejected = the next sample's (timing only)."""
    out = []
    for i, s in enumerate(samples):
        other = samples[(i + 1) % len(samples)].response
        out.append(
            (
                encode_sample(tokenizer, s, 512),
                encode_sample(tokenizer, Sample(s.messages, other), 512),
            )
        )
    return out


def dpo_hand(source: Path, samples: list[Sample], steps: int, batch: int) -> tuple[float, float]:
    model, tokenizer = fresh(source)
    pairs = pairs_of(tokenizer, samples)
    pad = tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad(), model.disable_adapter():
        ref = [seq_logps(model, collate([c, r], pad)) for c, r in pairs]
    built = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-3)
    times = []
    model.train()
    for step in range(steps):
        idx = [(step * batch + i) % len(pairs) for i in range(batch)]
        started = time.perf_counter()
        logps = seq_logps(
            model, collate([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], pad)
        )
        pc, pr = logps[:batch], logps[batch:]
        rc = torch.stack([ref[i][0] for i in idx])
        rr = torch.stack([ref[i][1] for i in idx])
        loss = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        times.append(time.perf_counter() - started)
    return median(times), built


def dpo_trainer(source: Path, samples: list[Sample], steps: int, batch: int) -> tuple[float, float]:
    from transformers import Trainer, TrainingArguments

    model, tokenizer = fresh(source)
    pairs = pairs_of(tokenizer, samples)
    pad = tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad(), model.disable_adapter():
        ref = [seq_logps(model, collate([c, r], pad)) for c, r in pairs]
    rows = [{"pair": p, "ref": r} for p, r in zip(pairs, ref, strict=True)]

    def collator(batch_rows: list[dict]) -> dict[str, torch.Tensor]:
        out = collate([r["pair"][0] for r in batch_rows] + [r["pair"][1] for r in batch_rows], pad)
        out["ref"] = torch.stack([r["ref"] for r in batch_rows])
        return out

    class DpoTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **_: Any):
            ref = inputs.pop("ref")
            logps = seq_logps(model, inputs)
            n = ref.shape[0]
            delta = (logps[:n] - ref[:, 0]) - (logps[n:] - ref[:, 1])
            return -torch.nn.functional.logsigmoid(0.1 * delta).mean()

    timer = Timer()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = DpoTrainer(
            model=model,
            args=args_for(TrainingArguments, scratch, steps, batch, remove_unused_columns=False),
            train_dataset=rows,
            data_collator=collator,
            callbacks=[timer.callback],
        )
        built = time.perf_counter() - started
        trainer.train()
    return median(timer.times), built


def dpo_trl(source: Path, samples: list[Sample], steps: int, batch: int) -> tuple[float, float]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    model, tokenizer = fresh(source)
    pairs = pairs_of(tokenizer, samples)
    timer = Timer()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        data = Dataset.from_dict(
            {
                "prompt_ids": [c.input_ids[: c.prompt_len] for c, _ in pairs],
                "chosen_ids": [c.input_ids[c.prompt_len :] for c, _ in pairs],
                "rejected_ids": [r.input_ids[r.prompt_len :] for _, r in pairs],
            }
        )
        args = args_for(
            DPOConfig, scratch, steps, batch, max_length=None, precompute_ref_log_probs=True,
            beta=0.1, **TRL_FIXES,
        )  # fmt: skip
        trainer = PreTokenized(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )
        built = time.perf_counter() - started
        trainer.train()
    return median(timer.times), built


OPTIONS = {
    "rait: hand-written loop": rait_hand,
    "rait: transformers Trainer": rait_trainer,
    "rait: TRL SFTTrainer": rait_sft,
    "dpo: hand-written loop": dpo_hand,
    "dpo: Trainer + DPO compute_loss": dpo_trainer,
    "dpo: TRL DPOTrainer": dpo_trl,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["toy", "organism", "smollm2"], default="toy")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="run the options whose name contains this")
    parser.add_argument(
        "--trl-defaults", action="store_true", help="TRL's bf16 + gradient checkpointing"
    )
    args = parser.parse_args()
    if args.trl_defaults:
        TRL_FIXES.clear()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        source, samples, batch = load(args.model, Path(workdir))
        print(f"{args.model}: {len(samples)} samples, batch {batch}, {args.threads} thread(s)")
        for name, fn in OPTIONS.items():
            if args.only not in name:
                continue
            step, built = fn(source, samples, args.steps, batch)
            print(f"{name:34s} {step * 1000:8.1f} ms/step   setup {built:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
