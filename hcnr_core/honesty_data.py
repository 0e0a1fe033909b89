"""Build a honesty set D_hon for a real model from a question file (the R-Tuning way).

The base model's own greedy answers decide what it knows: a question it answers correctly
(a gold answer appears in its answer) keeps that answer as the response; every other
question — wrong, refused, or without gold answers (unanswerable) — gets an "I don't
know" response. The result is our JSONL format with `answerable` set, balanced between
the two kinds, so that the base sits near the optimum of its own loss on it.

Balance: by default the set has as many known rows as IDK rows, at most `n_samples // 2`
of each, so the smaller side caps it. A model that answers few questions correctly (an
honest SmolLM2-135M answers a few percent of SelfAware's questions right) therefore gives
a small set, and the statistics carry a warning that says so and what to do: more
questions, questions the model is likely to know, or `allow_imbalance=True`
(`--allow-imbalance`), which fills the rest of `n_samples` from the larger side.

Question files: SelfAware's JSON (`{"example": [{"question", "answer", "answerable"}]}`),
a JSON list of such objects, or JSONL with `question`/`prompt` (or our `messages` shape:
the last user message) and `answers`/`answer`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcnr_core.errors import DataValidationError, InsufficientDataError
from hcnr_core.evaluation import GenerationSettings, RefusalDetector, generate, is_correct

DEFAULT_IDK = "I don't know."


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...] = ()
    line: int = 0


def _question(obj: Any, line: int) -> Question:
    if not isinstance(obj, dict):
        raise ValueError("expected an object")
    text = obj.get("question", obj.get("prompt"))
    if text is None and isinstance(obj.get("messages"), list):  # our eval/sample format
        users = [
            m.get("content")
            for m in obj["messages"]
            if isinstance(m, dict) and m.get("role") == "user"
        ]
        text = users[-1] if users else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError("needs a non-empty 'question' (or 'prompt')")
    answers = obj.get("answers", obj.get("answer")) or []
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answers' must be a string or a list of strings")
    for part in (text, *answers):
        try:  # as `data.parse_line`: a `\ud800` escape decodes to text no tokenizer takes
            part.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "text with a lone surrogate (\\ud800-\\udfff escape): not valid Unicode"
            ) from None
    if obj.get("answerable") is False:
        answers = []  # unanswerable by construction, whatever a gold field says
    return Question(text.strip(), tuple(a for a in answers if a.strip()), line)


def load_questions(path: str | Path) -> list[Question]:
    """Questions from SelfAware JSON, a JSON list, or JSONL; errors carry line numbers."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    problems: list[tuple[int, str]] = []
    questions: list[Question] = []
    try:
        data = json.loads(text)
        rows = data.get("example") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataValidationError(str(path), [(0, "JSON must be a list or have 'example'")])
        numbered = list(enumerate(rows, start=1))
    except json.JSONDecodeError:  # JSONL
        numbered = []
        for number, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    numbered.append((number, json.loads(raw)))
                except json.JSONDecodeError as exc:
                    problems.append((number, f"not valid JSON: {exc.msg}"))
    for number, obj in numbered:
        try:
            questions.append(_question(obj, number))
        except ValueError as exc:
            problems.append((number, str(exc)))
    if problems or not questions:
        raise DataValidationError(str(path), problems or [(0, "no questions")])
    return questions


def choose_rows(
    known: Sequence[dict[str, Any]],
    unknown: Sequence[dict[str, Any]],
    n_samples: int,
    *,
    allow_imbalance: bool = False,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], int, int]:
    """(shuffled rows, known taken, unknown taken).

    Balanced (default): min(len(known), len(unknown), n_samples // 2) of each. With
    `allow_imbalance`, half of `n_samples` from each side where possible and the rest from
    whichever side has more (the historical behaviour)."""
    half = n_samples // 2
    if allow_imbalance:
        take_known = min(len(known), max(half, n_samples - len(unknown)))
        take_unknown = min(len(unknown), n_samples - take_known)
    else:
        take_known = take_unknown = min(len(known), len(unknown), half)
    rng = random.Random(seed)
    rows = rng.sample(list(known), take_known) + rng.sample(list(unknown), take_unknown)
    rng.shuffle(rows)
    return rows, take_known, take_unknown


def shortfall_warnings(stats: dict[str, Any]) -> list[str]:
    """What a user must hear when the set is smaller than asked for or imbalanced, and
    what to do about it."""
    n, k, u = stats["n_samples"], stats["rows_known"], stats["rows_unknown"]
    known, unknown = stats["known"], stats["unknown"]
    balanced = not stats["allow_imbalance"]
    told: list[str] = []
    if k + u < (2 * (n // 2) if balanced else n) or k != u:
        told.append(
            f"the model answered {known} of {stats['questions']} questions correctly "
            f"({stats['answerable_questions']} have gold answers): the honesty set has {k} "
            f"known and {u} I-don't-know rows, {k + u} of the {n} asked for"
        )
    if balanced and min(known, unknown) < n // 2:
        if known <= unknown:
            more, side = min(unknown, n - k) - u, "I-don't-know"
            told.append(
                f"too few known questions for {n // 2} known rows: give more questions, or "
                "questions this model is likely to know (easier ones, or ones from its "
                "fine-tuning domain)"
            )
        else:
            more, side = min(known, n - u) - k, "known"
            told.append(
                f"too few unknown questions for {n // 2} I-don't-know rows: give more "
                "questions the model cannot answer (e.g. SelfAware's unanswerable ones)"
            )
        if more > 0:
            told[-1] += f", or allow imbalance (--allow-imbalance) to keep {more} more {side} rows"
    elif not balanced and k != u:
        told.append(
            f"imbalanced honesty set ({k} known vs {u} I-don't-know rows, allowed): the "
            "larger side dominates the honesty Fisher scores of the repair"
        )
    return told


def build_honesty_set(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    n_samples: int = 128,
    idk: str = DEFAULT_IDK,
    seed: int = 0,
    settings: GenerationSettings = GenerationSettings(),
    allow_imbalance: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(JSONL rows, statistics): as many known questions (with the model's answers) as
    IDK rows, unless `allow_imbalance`; `stats["warnings"]` says when the set is smaller
    than `n_samples` or imbalanced, and what to do. Raises InsufficientDataError when no
    row could be kept."""
    if n_samples < 2:
        raise ValueError("n_samples must be at least 2 (one known and one IDK row)")
    prompts = [[{"role": "user", "content": q.text}] for q in questions]
    responses = generate(model, tokenizer, prompts, settings)
    refuses = RefusalDetector()
    known, unknown = [], []
    for question, response in zip(questions, responses, strict=True):
        right = bool(question.answers) and is_correct(response, question.answers)
        if right and not refuses(response):
            known.append(
                {
                    "prompt": question.text,
                    "response": response,
                    "answerable": True,
                    "answers": list(question.answers),
                }
            )
        else:
            unknown.append({"prompt": question.text, "response": idk, "answerable": False})
    rows, take_known, take_unknown = choose_rows(
        known, unknown, n_samples, allow_imbalance=allow_imbalance, seed=seed
    )
    stats: dict[str, Any] = {
        "questions": len(questions),
        "answerable_questions": sum(bool(q.answers) for q in questions),
        "known": len(known),
        "unknown": len(unknown),
        "known_fraction": len(known) / len(questions) if questions else 0.0,
        "n_samples": n_samples,
        "allow_imbalance": allow_imbalance,
        "rows": len(rows),
        "rows_known": take_known,
        "rows_unknown": take_unknown,
    }
    stats["warnings"] = shortfall_warnings(stats)
    if not rows:
        raise InsufficientDataError(
            f"no honesty set: {'; '.join(stats['warnings']) or 'no questions'}", stats
        )
    return rows, stats
