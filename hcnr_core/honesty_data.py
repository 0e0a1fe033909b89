"""Build a honesty set D_hon for a real model from a question file (the R-Tuning way).

The base model's own greedy answers decide what it knows: a question it answers correctly
(a gold answer appears in its answer) keeps that answer as the response; every other
question — wrong, refused, or without gold answers (unanswerable) — gets an "I don't
know" response. The result is our JSONL format with `answerable` set, balanced between
the two kinds, so that the base sits near the optimum of its own loss on it.

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

from hcnr_core.errors import DataValidationError
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


def build_honesty_set(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    n_samples: int = 128,
    idk: str = DEFAULT_IDK,
    seed: int = 0,
    settings: GenerationSettings = GenerationSettings(),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(JSONL rows, statistics): half known questions with the model's answers, half IDK."""
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
    rng = random.Random(seed)
    half = n_samples // 2
    take_known = min(len(known), max(half, n_samples - len(unknown)))
    take_unknown = min(len(unknown), n_samples - take_known)
    rows = rng.sample(known, take_known) + rng.sample(unknown, take_unknown)
    rng.shuffle(rows)
    stats = {
        "questions": len(questions),
        "known": len(known),
        "unknown": len(unknown),
        "known_fraction": len(known) / len(questions),
        "rows": len(rows),
        "rows_known": take_known,
        "rows_unknown": take_unknown,
    }
    return rows, stats
