"""bench.realmodel's honesty-data research rows (issue #13, "more or better honesty data"):
the files they repair from, built beside a build's data once and read back after."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture()
def build(toy: dict[str, Path], tmp_path: Path) -> dict:
    """A build's layout (root/data/honesty.jsonl, align.jsonl) around the toy's data."""
    data = tmp_path / "build" / "data"
    data.mkdir(parents=True)
    rows = read(toy["honesty"])
    shutil.copy(toy["honesty"], data / "honesty.jsonl")
    aligned = [{**r, "aligned": i} for i, r in enumerate(rows * 3)]  # tagged: which were drawn
    (data / "align.jsonl").write_text("".join(json.dumps(r) + "\n" for r in aligned))
    return {"root": data.parent, "base": toy["base"], "rows": rows}


def test_honesty256_adds_as_many_alignment_rows_drawn_by_seed(build: dict) -> None:
    from bench.realmodel import honesty_variant

    path, stats = honesty_variant("honesty256", build, seed=3, settings=None)
    rows = read(path)
    n = len(build["rows"])
    assert stats == {"rows": 2 * n, "from_alignment": n} and len(rows) == 2 * n
    assert rows[:n] == build["rows"]  # the build's own rows, then the drawn ones
    drawn = [r["aligned"] for r in rows[n:]]
    assert len(set(drawn)) == n  # without replacement
    path.unlink()  # built again from the same seed: the same draw
    again = read(honesty_variant("honesty256", build, 3, None)[0])
    assert [r["aligned"] for r in again[n:]] == drawn


def test_selfbuilt_relabels_the_build_questions_by_the_base(build: dict) -> None:
    from bench.realmodel import honesty_variant
    from hcnr_core.evaluation import GenerationSettings

    path, stats = honesty_variant("selfbuilt", build, 0, GenerationSettings(4, 8, 128))
    rows = read(path)
    # every question kept (imbalance allowed), each either the base's right answer or IDK
    assert stats["rows"] == len(rows) == len(build["rows"]) == stats["questions"]
    assert stats["rows_known"] + stats["rows_unknown"] == len(rows)
    assert all(r["answerable"] or r["response"] == "I don't know." for r in rows)
    # the second call reads what the first wrote (the seed's later rows reuse it)
    path.write_text(path.read_text().replace("I don't know.", "IDK"))
    assert honesty_variant("selfbuilt", build, 0, None)[0].read_text() == path.read_text()


def test_unknown_honesty_data_is_refused(build: dict) -> None:
    from bench.realmodel import honesty_variant

    with pytest.raises(ValueError, match="unknown honesty data"):
        honesty_variant("more", build, 0, None)
