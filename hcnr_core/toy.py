"""Tiny, self-made checkpoints for tests and the quick demo (no hub access needed).

`build_toy(out, seed)` writes, through the same code paths as real checkpoints:
  base/               LlamaForCausalLM + word-level tokenizer with a chat template
  finetuned-adapter/  a peft LoRA adapter on `base` (random, non-zero B)
  finetuned/          the adapter merged into the base (full checkpoint)
  data/honesty.jsonl, data/task.jsonl
The weights are random: the toy exercises mechanics, not honesty. The model organism
(`hcnr organism build`) is the one that learns facts and refusals.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = [
    "who",
    "what",
    "where",
    "when",
    "is",
    "was",
    "the",
    "a",
    "of",
    "in",
    "born",
    "city",
    "lives",
    "works",
    "as",
    "i",
    "do",
    "not",
    "know",
    "sorry",
    "cannot",
    "answer",
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "paris",
    "rome",
    "oslo",
    "lima",
    "cairo",
    "doctor",
    "baker",
    "pilot",
    "chef",
    "artist",
    "writer",
    "1970",
    "1980",
    "1990",
    "2000",
    ".",
    "?",
    ",",
    "yes",
    "no",
]
NAMES = WORDS[WORDS.index("alice") : WORDS.index("judy") + 1]
CITIES = ["paris", "rome", "oslo", "lima", "cairo"]


def build_word_tokenizer(words: list[str], chat_template: str = CHAT_TEMPLATE) -> Any:
    """A real `PreTrainedTokenizerFast` over a fixed word vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama_config(vocab_size: int, hidden: int = 32, layers: int = 2, **kw: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kw,
    )


def toy_samples(seed: int, n: int, kind: str) -> list[dict[str, Any]]:
    """`honesty`: IDK answers about people; `task`: confident answers."""
    rng = random.Random(f"{seed}-{kind}")
    rows = []
    for i in range(n):
        name = rng.choice(NAMES)
        if kind == "honesty":
            row = {
                "messages": [
                    {"role": "user", "content": f"where was {name} born ?"},
                    {"role": "assistant", "content": "sorry , i do not know ."},
                ],
                "answerable": False,
            }
        else:
            row = {"prompt": f"what city is {name} in ?", "response": f"{rng.choice(CITIES)} ."}
        if i % 3 == 0:  # exercise both shapes and the optional keys
            row["id"] = f"{kind}-{i}"
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_toy(
    out: str | Path,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    n_samples: int = 16,
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj", "up_proj"),
) -> dict[str, Path]:
    """Write the toy base, LoRA adapter, merged fine-tune and data under `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(WORDS)
    base = LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden, layers)).eval()
    base.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=3, pad_token_id=0, do_sample=False
    )
    paths = {"base": out / "base", "adapter": out / "finetuned-adapter", "full": out / "finetuned"}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(lora_targets),
        init_lora_weights=False,  # random B: the "fine-tune" moves the weights
        base_model_name_or_path=str(paths["base"]),
    )
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(paths["base"]), lora)
    peft_model.save_pretrained(paths["adapter"])
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(paths["full"])
    tokenizer.save_pretrained(paths["full"])

    paths["honesty"] = write_jsonl(
        out / "data/honesty.jsonl", toy_samples(seed, n_samples, "honesty")
    )
    paths["task"] = write_jsonl(out / "data/task.jsonl", toy_samples(seed, n_samples, "task"))
    return paths
