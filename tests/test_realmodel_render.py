"""`bench.realmodel --render` renders the saved per-seed results it finds and runs nothing:
how one model measured on fewer seeds than another is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "realmodel.json"


def test_render_takes_saved_results_only_and_names_the_missing(tmp_path: Path, capsys):
    from bench import realmodel

    saved = json.loads(RESULTS.read_text())
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    seeds = sorted({r["seed"] for r in saved})
    for r in saved:  # one seed of the committed results goes missing
        if r["seed"] != seeds[-1]:
            (work / f"result-{r['model']}-{r['seed']}-quick.json").write_text(json.dumps(r))
    models = list(dict.fromkeys(r["model"] for r in saved))
    argv = ["--quick", "--render", "--models", *models, "--seeds", *map(str, seeds)]
    argv += ["--work", str(work)]
    realmodel.main([*argv, "--out", str(out)])

    rendered = json.loads((out / "realmodel.json").read_text())
    kept = [(r["model"], r["seed"]) for r in saved if r["seed"] != seeds[-1]]
    assert [(r["model"], r["seed"]) for r in rendered] == kept
    markdown = (out / "realmodel.md").read_text()
    assert "--render" not in markdown.splitlines()[2]  # the command a reader would rerun
    for model in {m for m, _ in kept}:
        measured = ", ".join(str(s) for m, s in kept if m == model)
        assert f"## {model} (seeds {measured})" in markdown
    assert f"seed {seeds[-1]}" in capsys.readouterr().err  # named as not measured
    assert not any(p.is_dir() for p in work.iterdir())  # nothing was built


def test_render_with_nothing_saved_fails(tmp_path: Path):
    from bench import realmodel

    with pytest.raises(SystemExit, match="nothing to render"):
        realmodel.main(["--render", "--work", str(tmp_path), "--out", str(tmp_path / "o")])


def test_a_seed_finished_by_add_renders_as_complete(tmp_path: Path):
    """A quick run interrupted, then finished row by row with `--add` (the probe too), is
    published as complete; one quick row missing keeps it marked incomplete."""
    from bench import realmodel

    result = json.loads(RESULTS.read_text())[0]
    assert realmodel.quick_complete(result)
    markdowns = []
    for name in (None, "random"):
        interrupted = {**result, "complete": False, "runs": dict(result["runs"])}
        interrupted["runs"].pop(name, None)
        work, out = tmp_path / f"work-{name}", tmp_path / f"out-{name}"
        work.mkdir()
        path = work / f"result-{result['model']}-{result['seed']}-quick.json"
        path.write_text(json.dumps(interrupted))
        argv = ["--quick", "--render", "--models", result["model"], "--seeds"]
        realmodel.main([*argv, str(result["seed"]), "--work", str(work), "--out", str(out)])
        markdowns.append((out / "realmodel.md").read_text())
    assert "**Incomplete run**" not in markdowns[0]
    assert f"**Incomplete run** (seeds [{result['seed']}])" in markdowns[1]


@pytest.mark.parametrize(
    ("best_f1", "sparse_f1", "verdicts"),
    [((0.5, 0.6), (0.5, 0.2), ("**not met**", "yes")), ((0.7, 0.6), (0.2, 0.3), ("**met**", "no"))],
)
def test_the_selection_ablation_is_judged_at_the_best_setting_and_at_a_tenth_of_the_columns(
    best_f1, sparse_f1, verdicts
):
    """The goal is judged at the best fixed setting; the sparse budget gets its own line,
    never the goal's verdict, and only where all three of its rows were measured."""
    from bench import realmodel

    best = realmodel.BEST_SETTING["gemma3-270m"]
    sparse = f"{best}_iw{realmodel.SPARSE_R_IW}"

    def run(f1: float) -> dict:
        return {"metrics": {"f1": f1, "domain_accuracy": 1.0}}

    runs = {"base": run(1.0), "finetuned": run(0.0)}
    for setting, (ours, ablated) in ((best, best_f1), (sparse, sparse_f1)):
        runs[setting] = run(ours)
        for selection in ("random", "honesty_only"):
            runs[f"{setting}_{selection}"] = run(ablated)
    result = {"model": "gemma3-270m", "seed": 0, "runs": runs}
    lines = realmodel.best_setting_ablation_goal([result])
    assert len(lines) == 2
    assert lines[0].startswith("- HCNR's best fixed setting") and lines[0].endswith(
        f"on refusal F1: {verdicts[0]}."
    )
    assert sparse in lines[1] and lines[1].endswith(f"on refusal F1: {verdicts[1]}.")

    del runs[f"{sparse}_random"]  # the sparse budget not measured: no line for it
    assert len(realmodel.best_setting_ablation_goal([result])) == 1


def test_wall_time_at_equal_honesty_names_the_cheapest_retraining_as_honest():
    """HCNR's time is set beside the cheapest RAIT/DPO run at least as honest (medians of
    the seeds' wall times), or says that none is."""
    from bench import realmodel

    best = realmodel.BEST_SETTING["smollm2-135m"]

    def run(f1: float, seconds: float) -> dict:
        return {"metrics": {"f1": f1, "domain_accuracy": 1.0}, "seconds": seconds}

    def seed(n: int, slow: float) -> dict:
        runs = {"base": run(1.0, 0), "finetuned": run(0.0, 0), best: run(0.6, 50)}
        runs |= {"auto_refit": run(0.9, 400), "rait_n16": run(0.3, 10), "rait": run(0.7, 90)}
        runs |= {"dpo": run(0.65, slow)}
        return {"model": "smollm2-135m", "seed": n, "runs": runs}

    # DPO is as honest as the best setting and timed 60 / 70 / 5000 s: its median is 70.
    lines = realmodel.equal_honesty_cost([seed(0, 60), seed(1, 70), seed(2, 5000)])
    assert lines[0].startswith("- Wall time at equal honesty: auto, defaults")
    assert lines[0].endswith(
        "no RAIT or DPO run is as honest; the most honest: RAIT-128 (F1 70.0, 90 s)."
    )
    assert lines[1] == (
        f"- Wall time at equal honesty: {best} (F1 60.0, 50 s); the cheapest retraining as "
        "honest: DPO-128 (F1 65.0, 70 s)."
    )
