"""LoRA supervised fine-tuning on transformers' `Trainer`, on the project's own encoding.

Samples are encoded exactly as the repair and the evaluation encode them
(`hcnr_core.data.encode_sample`: the chat-template prompt, then the response + EOS) and
collated with labels on response tokens only, so training, repair and evaluation never
disagree about a prompt's tokens.

Why not TRL's `SFTTrainer`: TRL 1.16 always replaces the LM head by a chunked log-prob
kernel (it also computes entropies and top-1 flags over the vocabulary). On these CPUs, in
a first trial, four steps of SmolLM2-135M on 16 short samples had not finished after 13
minutes, where `Trainer` takes 10-20 s a step; `bench/trl_step.py` times both. `Trainer` is
the same loop without that head.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hcnr_core.batching import Collator, pad_token_id
from hcnr_core.data import encode_sample, parse_sample

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraRecipe:
    epochs: float = 1.0
    lr: float = 2e-4
    batch_size: int = 16
    r: int = 16
    alpha: int = 32
    max_len: int = 160
    warmup_ratio: float = 0.05  # a float warmup_steps is a fraction of the steps


def lora_sft(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    recipe: LoraRecipe,
    *,
    seed: int,
    base_name: str,
    progress: Callable[[int, int, float | None], None] | None = None,
) -> tuple[Any, list[float]]:
    """Train a LoRA on `rows`; returns the peft model (unmerged) and the logged losses.

    `progress(step, total, loss)` is called after every optimizer step. `base_name` is
    recorded as the adapter's `base_model_name_or_path`.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    losses: list[float] = []

    class Report(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if progress is not None:
                progress(state.global_step, state.max_steps, losses[-1] if losses else None)

    lora = LoraConfig(
        r=recipe.r,
        lora_alpha=recipe.alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory(prefix="hcnr-sft-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            num_train_epochs=recipe.epochs,
            learning_rate=recipe.lr,
            per_device_train_batch_size=recipe.batch_size,
            lr_scheduler_type="cosine",
            warmup_steps=recipe.warmup_ratio,
            weight_decay=0.0,
            remove_unused_columns=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            use_cpu=next(model.parameters()).device.type == "cpu",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        with warnings.catch_warnings():  # peft/trl advisories about v5 APIs and padding
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, lora)
            trainer = Trainer(
                model=peft_model,
                args=args,
                train_dataset=[
                    encode_sample(tokenizer, parse_sample(r), recipe.max_len) for r in rows
                ],
                data_collator=Collator(pad_token_id(tokenizer)),
                callbacks=[Report()],
            )
            trainer.remove_callback(PrinterCallback)  # our progress replaces its log lines
            trainer.train()
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.eval()
    return peft_model, losses
