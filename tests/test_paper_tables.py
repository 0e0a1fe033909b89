"""`bench.paper_tables --reuse` re-renders the published tables from the saved results,
byte for byte: the committed organism.md is what the committed organism.json renders to,
and re-rendering runs nothing (no organism is built, no seed is repaired)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bench import paper_tables

RESULTS = Path(paper_tables.__file__).resolve().parent / "results"


def test_reuse_renders_the_committed_markdown_from_the_committed_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("--reuse with every seed saved must not run a seed")

    monkeypatch.setattr(paper_tables, "one_seed", must_not_run)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    shutil.copyfile(RESULTS / "organism.json", out / "organism.json")
    threads = torch.get_num_threads()
    try:  # main sets one torch thread for the benchmark; the test process keeps its own
        paper_tables.main(["--reuse", "--work", str(work), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert (out / "organism.md").read_bytes() == (RESULTS / "organism.md").read_bytes()
    assert (out / "organism.json").read_bytes() == (RESULTS / "organism.json").read_bytes()
    assert list(work.iterdir()) == []  # no per-seed cache written: nothing ran


def test_reuse_does_not_take_a_quick_sweep_for_a_full_one(tmp_path: Path) -> None:
    saved = tmp_path / "organism.json"
    shutil.copyfile(RESULTS / "organism.json", saved)
    assert sorted(paper_tables.saved_results(saved, quick=False)) == [0, 1, 2]
    assert paper_tables.saved_results(saved, quick=True) == {}  # saved before --quick
    assert paper_tables.saved_results(tmp_path / "absent.json", quick=False) == {}


def test_the_command_names_the_seeds_and_sweep_only() -> None:
    assert paper_tables.command_of([0, 1, 2], False) == "python -m bench.paper_tables --seeds 0 1 2"
    assert paper_tables.command_of([0], True) == "python -m bench.paper_tables --seeds 0 --quick"
