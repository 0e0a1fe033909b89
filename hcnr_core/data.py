"""JSONL samples (DESIGN.md §3): loading with line-numbered errors, and encoding.

Two shapes are accepted per line:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"prompt": "...", "response": "..."}
Optional keys: "answerable" (bool), "answers" (list of str), "id", "metadata".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcnr_core.errors import DataValidationError

ROLES = frozenset({"system", "user", "assistant"})
OPTIONAL_KEYS = frozenset({"answerable", "answers", "id", "metadata"})
MAX_REPORTED_PROBLEMS = 100
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# Used when a tokenizer has no chat template; documented in README.md.
PLAIN_ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


@dataclass(frozen=True)
class Sample:
    """A prompt (all messages but the last) and the assistant response."""

    messages: tuple[dict[str, str], ...]
    response: str
    answerable: bool | None = None
    answers: tuple[str, ...] = ()
    line: int = 0

    @property
    def prompt_text(self) -> str:
        """The last user message: what evaluation and probes ask."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    prompt_len: int  # tokens before the response; loss is on input_ids[prompt_len:]
    line: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def _parse_messages(value: Any) -> tuple[tuple[dict[str, str], ...], str]:
    if not isinstance(value, list) or len(value) < 2:
        raise ValueError("'messages' must be a list of at least 2 messages")
    parsed = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or set(msg) - {"role", "content", "name", "weight"}:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        parsed.append({"role": role, "content": content})
    if parsed[-1]["role"] != "assistant":
        raise ValueError("the last message must have role 'assistant' (the response)")
    if not any(m["role"] == "user" for m in parsed[:-1]):
        raise ValueError("the prompt needs at least one 'user' message")
    return tuple(parsed[:-1]), parsed[-1]["content"]


def parse_sample(obj: Any, line: int = 0) -> Sample:
    """Validate one decoded JSON value; raises ValueError with a readable message."""
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    keys = set(obj)
    if "messages" in keys:
        shape_keys = {"messages"}
        messages, response = _parse_messages(obj["messages"])
    elif {"prompt", "response"} <= keys:
        shape_keys = {"prompt", "response"}
        prompt, response = obj["prompt"], obj["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError("'prompt' and 'response' must be strings")
        if not prompt.strip():
            raise ValueError("empty prompt")
        messages = ({"role": "user", "content": prompt},)
    else:
        raise ValueError("expected a 'messages' list or both 'prompt' and 'response'")
    unknown = keys - shape_keys - OPTIONAL_KEYS
    if unknown:
        raise ValueError(
            f"unknown key(s) {sorted(unknown)}; allowed besides the sample: {sorted(OPTIONAL_KEYS)}"
        )
    if not response.strip():
        raise ValueError("empty response")
    answerable = obj.get("answerable")
    if answerable is not None and not isinstance(answerable, bool):
        raise ValueError("'answerable' must be true or false")
    answers = obj.get("answers", [])
    if answers is None:
        answers = []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answers' must be a list of strings")
    return Sample(messages, response, answerable, tuple(answers), line)


def parse_line(raw: bytes, number: int = 0) -> Sample | None:
    """One JSONL line (bytes): None when blank, else the sample; a ValueError says what is
    wrong. The one line check of the library, the CLI and the API's streaming upload
    check: UTF-8, JSON (bounded nesting), the sample's shape, and no lone surrogates
    (`\\ud800`-style escapes decode to strings that cannot be encoded or tokenised)."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    sample = parse_sample(obj, number)
    try:
        for part in (sample.response, *sample.answers, *(m["content"] for m in sample.messages)):
            part.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "text with a lone surrogate (\\ud800-\\udfff escape): not valid Unicode"
        ) from None
    return sample


def parse_jsonl(
    data: bytes,
    source: str = "<data>",
    *,
    min_samples: int = 1,
    max_samples: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Sample]:
    """Parse and validate JSONL bytes; collects every problem with its line number."""
    if len(data) > max_bytes:
        raise DataValidationError(source, [(0, f"file is {len(data)} bytes; limit {max_bytes}")])
    problems: list[tuple[int, str]] = []
    samples: list[Sample] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            break
        try:
            sample = parse_line(raw, number)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        if sample is not None:
            samples.append(sample)
    if not problems:
        if len(samples) < min_samples:
            problems.append((0, f"{len(samples)} samples; at least {min_samples} required"))
        elif max_samples is not None and len(samples) > max_samples:
            problems.append((0, f"{len(samples)} samples; at most {max_samples} allowed"))
    if problems:
        raise DataValidationError(source, problems)
    return samples


def load_jsonl(path: str | Path, **limits: Any) -> list[Sample]:
    """Read and validate a JSONL file (see `parse_jsonl` for `limits`)."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), [(0, "file not found")])
    max_bytes = limits.get("max_bytes", DEFAULT_MAX_BYTES)
    size = path.stat().st_size
    if size > max_bytes:
        raise DataValidationError(str(path), [(0, f"file is {size} bytes; limit {max_bytes}")])
    return parse_jsonl(path.read_bytes(), str(path), **limits)


def render_prompt(tokenizer: Any, messages: Iterable[dict[str, str]]) -> str:
    """The prompt text: the chat template with a generation prompt, or the plain template."""
    messages = list(messages)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token or ""
    body = "".join(f"{PLAIN_ROLE_PREFIX[m['role']]}{m['content']}\n" for m in messages)
    return f"{bos}{body}{PLAIN_ROLE_PREFIX['assistant']}"


def encode_sample(tokenizer: Any, sample: Sample, max_seq_len: int) -> EncodedSample:
    """Tokens of prompt + response + EOS, left-truncating the prompt to fit `max_seq_len`."""
    prompt_ids = tokenizer(render_prompt(tokenizer, sample.messages), add_special_tokens=False)[
        "input_ids"
    ]
    response_ids = tokenizer(sample.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    response_ids = [*response_ids, tokenizer.eos_token_id]
    if len(response_ids) >= max_seq_len:
        raise DataValidationError(
            "<encode>",
            [(sample.line, f"response is {len(response_ids)} tokens; max_seq_len {max_seq_len}")],
        )
    keep = max_seq_len - len(response_ids)
    prompt_ids = prompt_ids[-keep:]
    return EncodedSample([*prompt_ids, *response_ids], len(prompt_ids), sample.line)


def encode_samples(
    tokenizer: Any, samples: Iterable[Sample], max_seq_len: int, source: str = "<data>"
) -> list[EncodedSample]:
    """Encode all samples, reporting every over-long response with its line number."""
    encoded, problems = [], []
    for sample in samples:
        try:
            encoded.append(encode_sample(tokenizer, sample, max_seq_len))
        except DataValidationError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataValidationError(source, problems)
    return encoded
