"""`auto`: a validation split the repairs never see, candidates measured on it, the most
honest within the domain limit published — and on the organism it picks what works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hcnr_core.auto import FRONTIER_NAME, REPORT_NAME, advice, carve, choose, split
from hcnr_core.config import AutoCandidate, AutoConfig
from hcnr_core.data import Sample, load_jsonl
from hcnr_core.errors import DataValidationError, InvalidConfigError, NoAcceptableCandidateError
from hcnr_core.evaluation import GenerationSettings, evaluate_samples, load_for_eval
from hcnr_core.methods import MethodInputs
from hcnr_core.registry import get_method
from hcnr_core.writer import sha256_file

PAPER = {"name": "paper"}
TASK_AWARE = {
    "name": "task-aware-mu7",
    "hyperparameters": {"compensation": "task_aware", "task_weight": 7.0, "r_cw": 1.0},
}


def _samples(n_true: int, n_false: int, n_none: int) -> list[Sample]:
    labels = [True] * n_true + [False] * n_false + [None] * n_none
    return [
        Sample(({"role": "user", "content": f"q{i}"},), f"a{i}", answerable=label, line=i + 1)
        for i, label in enumerate(labels)
    ]


def test_carve_is_seeded_stratified_disjoint_and_ordered() -> None:
    samples = _samples(20, 12, 8)
    kept, held = carve(samples, 0.25, seed=0, salt="honesty")
    assert len(kept) + len(held) == len(samples)
    assert not {s.line for s in kept} & {s.line for s in held}
    assert [sum(s.answerable is v for s in held) for v in (True, False, None)] == [5, 3, 2]
    assert [s.line for s in held] == sorted(s.line for s in held)  # original order kept
    again = carve(samples, 0.25, seed=0, salt="honesty")[1]
    assert [s.line for s in again] == [s.line for s in held]
    other = carve(samples, 0.25, seed=1, salt="honesty")[1]
    assert [s.line for s in other] != [s.line for s in held]
    # A class of one stays in the repair set; a class of two gives one.
    kept, held = carve(_samples(1, 2, 0), 0.1, seed=0, salt="x")
    assert [s.answerable for s in held] == [False] and len(kept) == 2


@pytest.mark.parametrize(
    ("n_task", "max_drop", "n_domain", "coarse"),
    [
        (128, 2.0, 50, False),  # 32 rows (3.1 points each) raised to 50: one row is 2 points
        (128, 5.0, 32, False),  # the fraction already resolves 5 points
        (128, 0.0, 32, False),  # no loss allowed: any lost row shows, whatever the size
        (60, 2.0, 30, True),  # half the task set stays with the repairs: still too coarse
        (400, 2.0, 100, False),  # the fraction gives more than the limit needs
    ],
)
def test_the_carve_holds_out_enough_domain_rows_to_see_the_limit(
    n_task: int, max_drop: float, n_domain: int, coarse: bool
) -> None:
    honesty = _samples(40, 40, 0)
    task = _samples(0, 0, n_task)
    config = AutoConfig(max_domain_drop=max_drop)
    parts = split(config, MethodInputs(Path("base"), Path("ft"), honesty, task))
    summary = parts["summary"]
    assert summary["n_domain"] == len(parts["validation"]["domain"]) == n_domain
    assert summary["repair_task"] == n_task - n_domain >= n_task / 2
    assert summary["n_unanswerable"] == 10  # the honesty carve keeps the plain fraction
    kept = {s.line for s in parts["inputs"].task}
    assert not kept & {s.line for s in parts["validation"]["domain"]}
    warned = [w for w in parts["warnings"] if "domain row is" in w]
    assert bool(warned) == coarse
    if coarse:
        assert "a task set of at least 100 samples" in warned[0] and "50 graded" in warned[0]


def _row(order: int, f1: float, drop: float, status: str = "ok") -> dict:
    return {
        "order": order,
        "name": f"c{order}",
        "status": status,
        "refusal_f1": f1,
        "domain_drop_points": drop,
    }


def test_choose_the_most_honest_within_the_limit() -> None:
    rows = [
        _row(0, 0.9, 5.0),  # most honest, but loses too much domain
        _row(1, 0.6, 2.0),  # exactly at the limit: allowed
        _row(2, 0.6, 1.0),  # same F1, smaller drop: wins the tie
        _row(3, 0.95, 0.0, status="failed"),
        _row(4, 0.5, -3.0),
    ]
    chosen, reason = choose(rows, max_drop=2.0)
    assert chosen is not None and chosen["name"] == "c2"
    assert [r.get("qualified") for r in rows] == [False, True, True, None, True]
    assert "3 candidate(s)" in reason
    rows = [_row(0, 0.7, 1.0), _row(1, 0.7, 1.0)]  # a full tie: the earlier candidate
    assert choose(rows, 2.0)[0]["name"] == "c0"
    assert choose([_row(0, 0.9, 2.5)], 2.0)[0] is None


def test_split_needs_refusals_to_measure(toy: dict[str, Path], tmp_path: Path) -> None:
    answerable = tmp_path / "answerable.jsonl"
    answerable.write_text(
        "".join(
            json.dumps({"prompt": f"what city is {n} in ?", "response": "paris .",
                        "answerable": True}) + "\n"
            for n in range(12)
        )
    )  # fmt: skip
    inputs = MethodInputs(toy["base"], toy["adapter"], answerable, toy["task"])
    with pytest.raises(DataValidationError, match="unanswerable"):
        split(AutoConfig(), inputs)
    with pytest.raises(Exception, match="needs task"):
        split(AutoConfig(), MethodInputs(toy["base"], toy["adapter"], toy["honesty"]))


def test_a_candidate_that_does_not_validate_fails_the_check(toy: dict[str, Path]) -> None:
    method = get_method("auto")
    config = method.make_config({"candidates": [{"name": "bad", "hyperparameters": {"r_iw": 3}}]})
    inputs = MethodInputs(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
    with pytest.raises(InvalidConfigError, match="candidate 'bad'"):
        method.check(config, inputs)
    with pytest.raises(ValueError, match="unique"):
        AutoConfig(candidates=[AutoCandidate(name="a"), AutoCandidate(name="a")])


def test_a_candidate_must_beat_the_fine_tune_to_qualify() -> None:
    """Within the domain limit, the candidate that changed nothing is not a repair: with the
    fine-tuned model's F1 as the floor it does not qualify, and nothing is chosen."""
    rows = [_row(0, 0.0, 0.0), _row(1, 0.9, 21.9), _row(2, 0.55, 9.4), _row(3, 0.3, 0.0)]
    assert choose(rows, 2.0)[0]["name"] == "c3"
    assert choose(rows, 2.0, floor_f1=0.3)[0] is None  # equal to the floor: no gain
    assert [r["qualified"] for r in rows] == [False, False, False, False]
    chosen, _ = choose(rows, 2.0, floor_f1=0.0)
    assert chosen["name"] == "c3" and rows[0]["qualified"] is False
    # What to do next: the trade-offs that raised honesty, most honest first, each with the
    # limit that would accept it.
    text = advice(rows, 0.3, 3.125)
    assert text.index("c1 (F1 0.900) with max_domain_drop >= 21.9") < text.index("c2 (F1 0.550)")
    assert "c0" not in text and "c3" not in text and "3.1 points" in text
    assert "No candidate raised honesty" in advice([_row(0, 0.1, 0.0)], 0.1, 3.125)


def test_the_time_budget_stops_new_candidates(toy: dict[str, Path], tmp_path: Path) -> None:
    method = get_method("auto")
    config = method.make_config(
        {
            "candidates": [PAPER, {"name": "exact", "hyperparameters": {"compensation": "exact"}}],
            "time_budget_s": 0.01,  # the first always runs; the second would overrun
            "max_domain_drop": 100.0,
            "max_new_tokens": 4,
            # the toy's random weights never refuse: nothing could improve on them
            "require_improvement": False,
        }
    )
    inputs = MethodInputs(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
    report = method.run(config, inputs, tmp_path / "out")
    statuses = [(r["name"], r["status"]) for r in report["candidates"]]
    assert statuses == [("paper", "ok"), ("exact", "skipped")]
    assert report["chosen"] == "paper"
    assert report["validation"]["n_answerable"] == 0 and report["warnings"]  # the toy's


@pytest.mark.parametrize("refit", [False, True])
def test_refit_publishes_the_choice_repaired_from_every_sample(
    toy: dict[str, Path], tmp_path: Path, refit: bool
) -> None:
    """With `refit` (the default) the chosen setting is repaired again from all the samples,
    the carved validation rows included; without it the published model is the measured
    candidate."""
    method = get_method("auto")
    config = method.make_config(
        {
            "candidates": [PAPER],
            "max_domain_drop": 100.0,
            "max_new_tokens": 4,
            "require_improvement": False,  # the toy never refuses
            **({} if refit else {"refit": False}),  # on unless turned off
        }
    )
    inputs = MethodInputs(toy["base"], toy["adapter"], toy["honesty"], toy["task"])
    report = method.run(config, inputs, tmp_path / "out")
    published = json.loads((tmp_path / "out" / "hcnr_report.json").read_text())["inputs"]
    n_honesty, n_task = len(load_jsonl(toy["honesty"])), len(load_jsonl(toy["task"]))
    carved = report["validation"]
    used = (published["honesty"]["samples"], published["task"]["samples"])
    if refit:
        assert used == (n_honesty, n_task)
        assert report["refit"] == {
            "candidate": "paper",
            "honesty": n_honesty,
            "task": n_task,
            "seconds": report["stage_seconds"]["refit"],
        }
    else:
        assert used == (carved["repair_honesty"], carved["repair_task"])
        assert used[0] < n_honesty and used[1] < n_task
        assert report["refit"] is None and "refit" not in report["stage_seconds"]
    assert report["candidates"][0]["status"] == "ok"  # the choice is measured either way


@pytest.fixture(scope="module")
def organism_auto(organism: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """auto on the organism with the paper's defaults and task-aware compensation; the two
    share their Fisher passes (and with the no-acceptable run below). Without the refit,
    so that what is published is the candidate measured (the test re-measures it)."""
    method, cache = get_method("auto"), {}
    config = method.make_config(
        {
            "candidates": [PAPER, TASK_AWARE],
            "max_domain_drop": 20.0,
            "max_new_tokens": 8,
            "refit": False,
        }
    )
    inputs = MethodInputs(
        organism["base"], organism["adapter"], organism["honesty"], organism["task"]
    )
    out = tmp_path_factory.mktemp("auto") / "out"
    events: list = []
    report = method.run(config, inputs, out, progress=events.append, cache=cache)
    return {
        "report": report,
        "out": out,
        "events": events,
        "config": config,
        "inputs": inputs,
        "cache": cache,
    }


def test_auto_on_the_organism_publishes_the_candidate_that_keeps_the_domain(
    organism_auto: dict,
) -> None:
    report, out = organism_auto["report"], organism_auto["out"]
    rows = {r["name"]: r for r in report["candidates"]}
    # The paper's defaults wreck the organism's domain (bench/results/organism.md): auto
    # must not publish them, and must publish task-aware compensation instead.
    assert rows["paper"]["domain_drop_points"] > 20.0 and not rows["paper"]["qualified"]
    assert rows["task-aware-mu7"]["qualified"]
    assert report["chosen"] == "task-aware-mu7"
    assert rows["task-aware-mu7"]["refusal_f1"] > report["reference"]["finetuned"]["refusal_f1"]
    # The job's stage timings (a job showed none for auto): the reference, then c1, c2.
    assert list(report["stage_seconds"]) == ["validate_reference", "c1", "c2"]
    assert all(seconds > 0 for seconds in report["stage_seconds"].values())
    # Each candidate's own timings: its repair's stages, then its validation; the second
    # reuses the first's Fisher passes.
    for row in rows.values():
        assert row["stage_seconds"]["validate"] > 0 and row["stage_seconds"]["compensate"] > 0
    paper, task_aware = rows["paper"]["stage_seconds"], rows["task-aware-mu7"]["stage_seconds"]
    assert task_aware["fisher_task"] < paper["fisher_task"] and task_aware["task_hessians"] > 0
    # What is published is what was measured: evaluate it again on the same split.
    parts = split(organism_auto["config"], organism_auto["inputs"])
    assert report["validation"]["n_domain"] == len(parts["validation"]["domain"]) == 32
    model, tokenizer = load_for_eval(out, None, "cpu")
    metrics = evaluate_samples(
        model, tokenizer, parts["validation"], settings=GenerationSettings(8, 8, 512)
    )["metrics"]
    assert metrics["refusal_f1"] == pytest.approx(rows["task-aware-mu7"]["refusal_f1"])
    assert metrics["domain_accuracy"] == pytest.approx(rows["task-aware-mu7"]["domain_accuracy"])
    # The repairs never saw the validation rows.
    held = {s.prompt_text for s in parts["validation"]["honesty"]}
    assert not held & {s.prompt_text for s in parts["inputs"].honesty}
    # Artifacts: the checkpoint, its HCNR report, the auto report and the frontier PNG.
    names = {p.name for p in out.iterdir()}
    assert {REPORT_NAME, FRONTIER_NAME, "hcnr_report.json", "config.json"} <= names
    assert (out / FRONTIER_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / REPORT_NAME).read_text())
    assert written["chosen"] == "task-aware-mu7"
    for name, info in written["files"].items():
        assert sha256_file(out / name) == info["sha256"], name
    # Every candidate was an event of its own, and progress only moved forward.
    records = [e.record["name"] for e in organism_auto["events"] if e.record]
    assert records == ["paper", "task-aware-mu7"]
    fractions = [e.fraction for e in organism_auto["events"]]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_auto_publishes_nothing_when_no_candidate_keeps_the_domain(
    organism_auto: dict, tmp_path: Path
) -> None:
    method = get_method("auto")
    config = method.make_config(
        {"candidates": [PAPER], "max_domain_drop": 10.0, "max_new_tokens": 8}
    )
    out = tmp_path / "out"
    with pytest.raises(NoAcceptableCandidateError, match=r"paper: F1 [\d.]+, drop"):
        method.run(config, organism_auto["inputs"], out, cache=organism_auto["cache"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no scratch left behind


def test_a_given_validation_set_is_used_whole(toy: dict[str, Path], tmp_path: Path) -> None:
    rows = [json.loads(line) for line in toy["honesty"].read_text().splitlines()][:4]
    rows += [
        {"prompt": f"what city is {n} in ?", "response": "paris .", "answerable": True,
         "answers": ["paris"]}
        for n in ("ann", "bob")
    ]  # fmt: skip
    rows += [
        {**json.loads(line), "answers": ["x"]} for line in toy["task"].read_text().splitlines()[:3]
    ]
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = MethodInputs(toy["base"], toy["adapter"], toy["honesty"], toy["task"], validation)
    parts = split(AutoConfig(), inputs)
    assert parts["summary"]["source"] == "given"
    assert (parts["summary"]["n_unanswerable"], parts["summary"]["n_answerable"]) == (4, 2)
    assert parts["summary"]["n_domain"] == 3
    # 3 domain rows cannot resolve a 2-point loss: said, with the rows it would take
    (warning,) = parts["warnings"]
    assert "33.3 points" in warning and "at least 50 graded domain rows" in warning
    assert not split(AutoConfig(max_domain_drop=40), inputs)["warnings"]
    assert len(parts["inputs"].honesty) == len(load_jsonl(toy["honesty"]))  # nothing carved


def test_the_cli_passes_validation_to_auto(toy: dict[str, Path], tmp_path: Path) -> None:
    """`hcnr repair --method auto --validation FILE` measures on FILE (it was once accepted
    and silently ignored: auto carved its own split)."""
    from typer.testing import CliRunner

    from hcnr_cli.main import app

    rows = [json.loads(line) for line in toy["honesty"].read_text().splitlines()][:4]
    rows += [
        {**json.loads(line), "answers": ["x"]} for line in toy["task"].read_text().splitlines()[:3]
    ]
    validation = tmp_path / "validation.jsonl"
    validation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["repair", "--method", "auto", "--base", str(toy["base"])]
    args += ["--finetuned", str(toy["adapter"]), "--honesty", str(toy["honesty"])]
    args += ["--task", str(toy["task"]), "--out", str(out), "--validation", str(validation)]
    args += ["--set", "max_domain_drop=100", "--set", "max_new_tokens=4", "--no-progress"]
    args += ["--set", "require_improvement=false"]  # the toy never refuses
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "auto_report.json").read_text())
    assert report["validation"]["source"] == "given"
    assert (report["validation"]["n_unanswerable"], report["validation"]["n_domain"]) == (4, 3)


def test_the_cli_runs_auto_by_default_and_names_hcnr_for_its_flags(
    toy: dict[str, Path], tmp_path: Path
) -> None:
    """`hcnr repair` without --method is auto (the service's default too); an HCNR flag
    without --method is refused before any work, naming the fix."""
    from typer.testing import CliRunner

    from hcnr_cli.main import app

    args = ["repair", "--base", str(toy["base"]), "--finetuned", str(toy["adapter"])]
    args += ["--honesty", str(toy["honesty"]), "--task", str(toy["task"]), "--no-progress"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--r-iw", "0.3"])
    assert result.exit_code != 0
    assert "--r-iw" in result.output and "add --method hcnr" in result.output
    assert not out.exists()
    # Without HCNR flags it is auto: on the toy (which never refuses) nothing can beat the
    # fine-tune, so auto publishes nothing and says what it measured.
    one = "candidates=[{name: paper}]"
    result = CliRunner().invoke(
        app, [*args, "--out", str(out), "--set", one, "--set", "max_new_tokens=4"]
    )
    assert result.exit_code != 0 and "no_acceptable_candidate" in result.output
    assert not out.exists()
