"""Why the real-model build trains on transformers' `Trainer` and not TRL's `SFTTrainer`.

    .venv/bin/python -m bench.trl_step [--steps 2] [--threads 2]

Times the same LoRA SFT steps (SmolLM2-135M, 16 SelfAware rows per step, the project's
encoding) through `hcnr_core.realmodel.train.lora_sft` (Trainer) and through TRL's
`SFTTrainer` given the same pre-tokenised rows with a completion mask. Prints seconds per
step of each. TRL 1.16 replaces the LM head by its chunked log-prob kernel whatever the
device. Note: `SFTConfig` is left at TRL's defaults here, bf16 autocast and gradient
checkpointing, and on the CPU those are where its time goes (60.5 s a step against 3.7 s
without them, `bench/baseline_trainers.py --model smollm2 [--trl-defaults]`), not the head.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from hcnr_core.data import encode_sample, parse_sample  # noqa: E402
from hcnr_core.realmodel.data import load_selfaware, make_datasets  # noqa: E402
from hcnr_core.realmodel.train import LoraRecipe, lora_sft  # noqa: E402
from hcnr_core.realmodels import cached_hf_model  # noqa: E402


def trl_steps(source: Path, rows: list[dict], steps: int) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    encoded = [encode_sample(tokenizer, parse_sample(r), 160) for r in rows]
    data = Dataset.from_dict(
        {
            "input_ids": [s.input_ids for s in encoded],
            "completion_mask": [[0] * s.prompt_len + [1] * s.response_len for s in encoded],
        }
    )
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=3e-4,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            completion_only_loss=True,
        )
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer,
            peft_config=lora,
        )  # fmt: skip
        started = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - started) / steps


def trainer_steps(source: Path, rows: list[dict], steps: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    started = time.perf_counter()
    lora_sft(model, tokenizer, rows, LoraRecipe(epochs=1.0), seed=0, base_name=str(source))
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    source = cached_hf_model("smollm2-135m")
    selfaware = load_selfaware(ROOT.parent / "shared" / "datasets" / "selfaware")
    rows = make_datasets(selfaware, seed=0)["align"][: 16 * args.steps]
    trainer = trainer_steps(source, rows, args.steps)
    print(f"transformers Trainer: {trainer:.1f} s/step", flush=True)
    trl = trl_steps(source, rows, args.steps)
    print(f"TRL SFTTrainer:       {trl:.1f} s/step ({trl / trainer:.1f}x)")


if __name__ == "__main__":
    main()
