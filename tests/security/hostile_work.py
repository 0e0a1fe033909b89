"""Hostile-*work* inputs (issue 14): checkpoints and data that are valid and safe, but ask
for unbounded work — an enormous config over tiny weights, a config that does not
match its weights, tensors over the size limits, a chat template that loops, one that is
quadratic in the sample, a tokenizer whose pre-tokenizer regex backtracks exponentially,
too many samples, too many tokens, too many bytes.

`build_work_world(top)` writes them next to the toy; `WORK_LIMITS` are the (small) limits
the tests run under, so every case trips its limit fast on any machine.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The limits every case is judged against (service settings / HCNR_* for the CLI).
VALIDATION_TIMEOUT = 8.0
WORK_LIMITS: dict[str, Any] = {
    "validation_timeout_seconds": VALIDATION_TIMEOUT,
    "max_parameters": 1_000_000,
    "max_checkpoint_bytes": 4 * 1024 * 1024,
    "max_tokens_per_sample": 2048,
    "max_tokens_per_job": 20_000,
    "max_samples": 1000,
    "max_data_bytes": 1024 * 1024,
}
# Seconds a refusal may take beyond the limit it trips (process start, a loaded machine:
# the suite runs on 2 shared cores).
MARGIN = 10.0

LOOP_TEMPLATE = (  # 10^10 iterations: the sandbox's range() cap (100000) does not help
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)
QUADRATIC_TEMPLATE = (  # cheap on "hello", quadratic in a long sample
    "{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}"
    "{% for d in m['content'] %}{% endfor %}{% endfor %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
BACKTRACKING_REGEX = "(a|aa)+$"  # exponential on 'aaaa...ab' in Oniguruma


@dataclass(frozen=True)
class WorkCase:
    name: str
    code: str  # the error code it must be refused with
    ref: str | None = None  # `path:` reference of the base (None: the toy's)
    honesty: str | None = None  # data file name under data/ (None: the toy's)
    timed: bool = False  # refused by the wall clock: takes about VALIDATION_TIMEOUT


@dataclass
class WorkWorld:
    models: Path
    toy: dict[str, Path]
    data: Path
    cases: list[WorkCase] = field(default_factory=list)

    def honesty(self, case: WorkCase) -> Path:
        return self.data / case.honesty if case.honesty else self.toy["honesty"]

    def base(self, case: WorkCase) -> Path:
        return self.models / case.ref.removeprefix("path:") if case.ref else self.toy["base"]


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _add_big_tensor(ckpt: Path, rows: int = 1024, cols: int = 1024) -> None:
    """One more float32 tensor (4 MiB + the toy): over max_checkpoint_bytes and
    max_parameters, a valid safetensors file otherwise."""
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    size = rows * cols * 4
    header["extra.big.weight"] = {
        "dtype": "F32",
        "shape": [rows, cols],
        "data_offsets": [len(data), len(data) + size],
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data + bytes(size))


def _backtracking_tokenizer(ckpt: Path) -> None:
    path = ckpt / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {"Regex": BACKTRACKING_REGEX},
                "behavior": "Isolated",
                "invert": False,
            },
            {"type": "WhitespaceSplit"},
        ],
    }
    path.write_text(json.dumps(tokenizer))


def _rows(prompt: str, response: str, n: int) -> str:
    row = {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
    }
    return "".join(json.dumps(row) + "\n" for _ in range(n))


def build_work_world(models: Path, toy: dict[str, Path]) -> WorkWorld:
    """The hostile-work checkpoints under models/work/, the data under data-work/."""
    work, data = models / "work", models.parent / "data-work"
    work.mkdir()
    data.mkdir()
    world = WorkWorld(models, toy, data)

    def checkpoint(name: str, mutate) -> str:
        target = work / name
        shutil.copytree(toy["base"], target)
        mutate(target)
        return f"path:work/{name}"

    cfg = lambda **c: lambda ckpt: _edit_json(ckpt / "config.json", **c)  # noqa: E731
    world.cases += [
        WorkCase(
            "huge-hidden-size",
            "checkpoint_too_large",
            checkpoint("huge-hidden-size", cfg(hidden_size=1_000_000)),
        ),
        WorkCase(
            "huge-layer-count",
            "checkpoint_too_large",
            checkpoint("huge-layer-count", cfg(num_hidden_layers=1_000_000)),
        ),
        WorkCase(
            "huge-vocab",
            "checkpoint_too_large",
            checkpoint("huge-vocab", cfg(vocab_size=50_000_000)),
        ),
        WorkCase(  # within every dimension limit, but ~100 M parameters in all
            "config-describes-too-much",
            "checkpoint_too_large",
            checkpoint(
                "config-describes-too-much",
                cfg(hidden_size=4096, num_hidden_layers=6, vocab_size=1000),
            ),
        ),
        WorkCase(
            "tensor-over-byte-limit",
            "checkpoint_too_large",
            checkpoint("tensor-over-byte-limit", _add_big_tensor),
        ),
        WorkCase(
            "chat-template-loops",
            "validation_timeout",
            checkpoint(
                "chat-template-loops",
                lambda c: (c / "chat_template.jinja").write_text(LOOP_TEMPLATE),
            ),
            timed=True,
        ),
    ]
    # Data: what the honesty file holds (the task file stays the toy's).
    long_prompt = "where was " + "x " * 3000 + "born ?"
    quadratic = "where was " + "x" * 6000 + " born ?"  # one token: only the template is slow
    (data / "quadratic.jsonl").write_text(_rows(quadratic, "sorry , i do not know .", 8))
    # Runs of 24 'a's: ~0.03 s of backtracking each, under Oniguruma's retry limit (a
    # longer run makes it panic at once instead); 400 of them per sample, 8 samples.
    backtracking = ("a" * 24 + "b ") * 400 + "?"
    (data / "backtracking.jsonl").write_text(_rows(backtracking, "sorry , i do not know .", 8))
    (data / "long-sample.jsonl").write_text(_rows(long_prompt, "sorry , i do not know .", 8))
    (data / "many-tokens.jsonl").write_text(_rows("who is " + "bob " * 300, "i do not know .", 80))
    (data / "many-samples.jsonl").write_text(_rows("who is bob ?", "i do not know .", 1001))
    (data / "many-bytes.jsonl").write_text(_rows("who ?" + " " * 40_000, "i do not know .", 30))
    world.cases += [
        WorkCase(
            "chat-template-quadratic",
            "validation_timeout",
            checkpoint(
                "chat-template-quadratic",
                lambda c: (c / "chat_template.jinja").write_text(QUADRATIC_TEMPLATE),
            ),
            honesty="quadratic.jsonl",
            timed=True,
        ),
        WorkCase(
            "tokenizer-backtracking-regex",
            "validation_timeout",
            checkpoint("tokenizer-backtracking-regex", _backtracking_tokenizer),
            honesty="backtracking.jsonl",
            timed=True,
        ),
        WorkCase("sample-over-token-limit", "too_many_tokens", honesty="long-sample.jsonl"),
        WorkCase("job-over-token-limit", "too_many_tokens", honesty="many-tokens.jsonl"),
        WorkCase("data-over-byte-limit", "data_too_large", honesty="many-bytes.jsonl"),
    ]
    # Over max_samples: the API refuses it at upload, the CLI at validation (same code).
    world.cases.append(
        WorkCase("file-over-sample-limit", "too_many_samples", honesty="many-samples.jsonl")
    )
    return world
