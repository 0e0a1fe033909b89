"""Shared by the CLI tests: `hcnr repair` arguments on the toy checkpoints.

A plain module (`from tests.toy_cli import repair_argv`), not a conftest fixture.
"""

from __future__ import annotations

from pathlib import Path


def repair_argv(toy: dict[str, Path], out: Path, *flags: str, **paths: Path) -> list[str]:
    """`hcnr repair` arguments on the toy (adapter fine-tune); `paths` replace its inputs."""
    inputs = {
        "base": toy["base"],
        "finetuned": toy["adapter"],
        "honesty": toy["honesty"],
        "task": toy["task"],
        **paths,
    }
    # HCNR itself, not the default method (auto): the CLI tests check HCNR's output; a
    # later --method in `flags` wins.
    argv = ["repair", "--method", "hcnr", "--out", str(out), "--no-progress"]
    for key, value in inputs.items():
        argv += [f"--{key}", str(value)]
    return [*argv, *flags]
