"""`hcnr build-honesty-data`: the model's own answers decide what it knows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core.data import load_jsonl, parse_jsonl
from hcnr_core.errors import DataValidationError, InsufficientDataError
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


def test_questions_with_lone_surrogates_are_refused_like_samples(tmp_path):
    """The question import checks text as the JSONL samples do (`data.parse_line`): a
    lone surrogate in a question or an answer is refused with its line, not written into
    a honesty set that the repair would refuse later."""
    bad = tmp_path / "q.jsonl"
    bad.write_text(
        '{"question": "ok ?"}\n{"question": "who \\ud800 ?"}\n'
        '{"question": "q ?", "answers": ["a\\udfff"]}\n'
    )
    with pytest.raises(DataValidationError) as info:
        load_questions(bad)
    assert [line for line, _ in info.value.problems] == [2, 3]
    assert all("lone surrogate" in why for _, why in info.value.problems)


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
        "--allow-imbalance",  # known people only: the base knows nearly all of them
    ]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(load_jsonl(out)) == 16
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 2 and "exists" in again.output


# --- balance: a model that knows few questions (no model needed) ---------------------------


def _quiz(n_known: int, n_wrong: int, n_unanswerable: int) -> tuple[list[Question], Any]:
    """Questions and a stand-in for `generate`: the first `n_known` are answered right,
    the next `n_wrong` wrong, the unanswerable ones (no gold answers) with a guess."""
    questions = [Question(f"known {i} ?", ("paris",)) for i in range(n_known)]
    questions += [Question(f"wrong {i} ?", ("rome",)) for i in range(n_wrong)]
    questions += [Question(f"open {i} ?") for i in range(n_unanswerable)]

    def answers(_model, _tokenizer, prompts, _settings):
        return ["It is Paris." for _ in prompts]

    return questions, answers


def test_few_known_questions_give_a_small_balanced_set_and_say_so(monkeypatch):
    """The user report: an honest SmolLM2 knew 6 of 200 SelfAware questions and the set
    was 6 known + 122 IDK rows, silently. Now: 6 + 6, with counts and what to do."""
    import hcnr_core.honesty_data as honesty_data

    questions, answers = _quiz(6, 134, 60)
    monkeypatch.setattr(honesty_data, "generate", answers)
    rows, stats = build_honesty_set(None, None, questions, n_samples=128, seed=1)
    assert (stats["known"], stats["unknown"], stats["answerable_questions"]) == (6, 194, 140)
    assert stats["rows_known"] == stats["rows_unknown"] == 6 and stats["rows"] == len(rows) == 12
    assert sum(r["answerable"] for r in rows) == 6
    assert {r["response"] for r in rows if not r["answerable"]} == {DEFAULT_IDK}
    said = " ".join(stats["warnings"])
    assert "answered 6 of 200 questions" in said and "12 of the 128 asked for" in said
    assert "more questions" in said and "likely to know" in said
    assert "--allow-imbalance" in said and "116 more I-don't-know rows" in said

    rows, stats = build_honesty_set(
        None, None, questions, n_samples=128, seed=1, allow_imbalance=True
    )
    assert (stats["rows_known"], stats["rows_unknown"], len(rows)) == (6, 122, 128)
    assert any("imbalanced" in w for w in stats["warnings"])


def test_balance_caps_by_the_smaller_side_either_way(monkeypatch):
    import hcnr_core.honesty_data as honesty_data

    questions, answers = _quiz(40, 0, 3)  # knows nearly everything
    monkeypatch.setattr(honesty_data, "generate", answers)
    rows, stats = build_honesty_set(None, None, questions, n_samples=16)
    assert (stats["rows_known"], stats["rows_unknown"], len(rows)) == (3, 3, 6)
    assert any("cannot answer" in w and "10 more known rows" in w for w in stats["warnings"])

    questions, answers = _quiz(40, 10, 30)  # enough of both: exactly half and half, silently
    monkeypatch.setattr(honesty_data, "generate", answers)
    rows, stats = build_honesty_set(None, None, questions, n_samples=16)
    assert (stats["rows_known"], stats["rows_unknown"], stats["warnings"]) == (8, 8, [])

    questions, answers = _quiz(0, 5, 5)  # knows nothing: no balanced set at all
    monkeypatch.setattr(honesty_data, "generate", answers)
    with pytest.raises(InsufficientDataError) as info:
        build_honesty_set(None, None, questions, n_samples=16)
    assert info.value.code == "insufficient_data" and info.value.stats["known"] == 0
    rows, stats = build_honesty_set(None, None, questions, n_samples=16, allow_imbalance=True)
    assert (stats["rows_known"], stats["rows_unknown"]) == (0, 10)


def test_cli_reports_a_shortfall_on_stderr_and_in_json(monkeypatch, tmp_path):
    import hcnr_core.evaluation as evaluation
    import hcnr_core.honesty_data as honesty_data

    questions, answers = _quiz(6, 134, 60)
    source = tmp_path / "questions.jsonl"
    source.write_text(
        "".join(
            json.dumps({"question": q.text, "answers": list(q.answers)}) + "\n" for q in questions
        )
    )
    monkeypatch.setattr(evaluation, "load_for_eval", lambda *_: (None, None))
    monkeypatch.setattr(honesty_data, "generate", answers)

    def run(out: Path, *flags: str):
        argv = ["build-honesty-data", "--model", str(tmp_path), "--questions", str(source)]
        return CliRunner().invoke(app, [*argv, "--out", str(out), *flags])

    result = run(tmp_path / "balanced.jsonl")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["known"], summary["unknown"]) == (6, 194)
    assert (summary["rows_known"], summary["rows_unknown"], summary["rows"]) == (6, 6, 12)
    assert len(load_jsonl(tmp_path / "balanced.jsonl")) == 12
    assert summary["warnings"] and "warning" in result.stderr
    assert "answered 6 of 200" in result.stderr and "--allow-imbalance" in result.stderr

    result = run(tmp_path / "imbalanced.jsonl", "--allow-imbalance")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["rows_known"], summary["rows_unknown"]) == (6, 122)

    questions, answers = _quiz(0, 8, 8)
    monkeypatch.setattr(honesty_data, "generate", answers)
    source.write_text(
        "".join(
            json.dumps({"question": q.text, "answers": list(q.answers)}) + "\n" for q in questions
        )
    )
    result = run(tmp_path / "none.jsonl")
    assert result.exit_code == 2 and "[insufficient_data]" in result.stderr
    assert "answered 0 of 16" in result.stderr and not (tmp_path / "none.jsonl").exists()
