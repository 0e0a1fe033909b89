"""`hcnr build-honesty-data`: the model's own answers decide what it knows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core.data import load_jsonl, parse_jsonl
from hcnr_core.errors import DataValidationError
from hcnr_core.evaluation import GenerationSettings, is_correct, load_for_eval
from hcnr_core.honesty_data import DEFAULT_IDK, Question, build_honesty_set, load_questions

SELFAWARE = Path(__file__).resolve().parents[2] / "shared/datasets/selfaware/SelfAware.json"


def test_selfaware_questions_load():
    if not SELFAWARE.exists():
        pytest.skip(f"SelfAware not found at {SELFAWARE}")
    questions = load_questions(SELFAWARE)
    raw = json.loads(SELFAWARE.read_text())["example"]
    assert len(questions) == len(raw) == 3369
    unanswerable = [q for q, r in zip(questions, raw, strict=True) if not r["answerable"]]
    assert len(unanswerable) == 1032 and all(q.answers == () for q in unanswerable)
    assert all(
        q.answers for q, r in zip(questions, raw, strict=True) if r["answerable"] and r["answer"]
    )


def test_jsonl_questions_and_their_errors(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"prompt": "who is ada ?", "answer": "a poet"}\n\n{"question": "x ?"}\n')
    assert load_questions(good) == [
        Question("who is ada ?", ("a poet",), 1),
        Question("x ?", (), 3),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "ok ?"}\n{oops\n{"question": ""}\n{"question": "q", "answers": 3}\n'
    )
    with pytest.raises(DataValidationError) as info:
        load_questions(bad)
    assert [line for line, _ in info.value.problems] == [2, 3, 4]


@pytest.fixture(scope="module")
def organism_questions(organism):
    """Known people's questions with their gold answers, and held-out names with a
    plausible but unverifiable gold answer: only the model's behaviour tells them apart."""
    known = [Question(s.prompt_text, s.answers) for s in load_jsonl(organism["eval_known"])]
    unknown = [Question(s.prompt_text, ("paris",)) for s in load_jsonl(organism["eval_unknown"])]
    return known, unknown


def test_base_answers_decide_known_and_unknown(organism, organism_questions):
    known, unknown = organism_questions
    model, tokenizer = load_for_eval(organism["base"], None, "cpu")
    rows, stats = build_honesty_set(
        model,
        tokenizer,
        known + unknown,
        n_samples=100,
        seed=3,
        settings=GenerationSettings(batch_size=64, max_new_tokens=8, max_seq_len=96),
    )
    assert stats["questions"] == len(known) + len(unknown)
    assert stats["known"] >= 0.9 * len(known)  # the base knows its people...
    assert stats["unknown"] >= 0.7 * len(unknown)  # ...and not the held-out names
    assert stats["rows"] == len(rows) == 100 and stats["rows_known"] == 50
    for row in rows:
        if row["answerable"]:
            assert is_correct(row["response"], row["answers"])
        else:
            assert row["response"] == DEFAULT_IDK
    data = "\n".join(json.dumps(r) for r in rows).encode()
    assert len(parse_jsonl(data)) == 100  # valid input for `hcnr repair`


def test_cli_writes_a_honesty_set(organism, tmp_path):
    out = tmp_path / "honesty.jsonl"
    argv = [
        "build-honesty-data",
        "--model",
        str(organism["base"]),
        "--questions",
        str(organism["eval_known"]),
        "--out",
        str(out),
        "--n-samples",
        "16",
        "--max-new-tokens",
        "8",
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(load_jsonl(out)) == 16
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 2 and "exists" in again.output
