"""`bench/gpu_check.sh` runs only where a GPU is lent (none so far), so what can be checked
without one is checked here: the script parses, names every step in its summary, and each
command it runs accepts the arguments the script gives it — a typo there would cost the
one device call a session gets."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import typer

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


def step_commands() -> dict[str, list[str]]:
    """`step NAME LIMIT $PY -m MODULE ARGS...` lines, continuation lines joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    steps = {}
    for line in text.splitlines():
        words = shlex.split(line.strip(), comments=True)
        if words[:1] == ["step"] and words[3:5] == ["$PY", "-m"]:
            steps[words[1]] = words[5:]
    return steps


def test_the_script_parses_and_has_every_step():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert set(step_commands()) == {
        "gpu-tests",
        "scale-8b",
        "scale-70b-layerwise",
        "realmodel-cuda",
    }


def test_each_step_accepts_its_arguments(tmp_path: Path):
    from bench.scale.__main__ import parse_args
    from hcnr_cli.main import app

    steps = {k: [w.replace("$OUT", str(tmp_path)) for w in v] for k, v in step_commands().items()}
    assert steps["gpu-tests"][:2] == ["pytest", "-m"] and steps["gpu-tests"][2] == "gpu"
    for name in ("scale-8b", "scale-70b-layerwise"):
        module, *argv = steps[name]
        assert module == "bench.scale"
        args = parse_args(argv)
        assert args.device == "cuda" and args.dtype == "bfloat16"
    assert parse_args(steps["scale-70b-layerwise"][1:]).layerwise
    module, *argv = steps["realmodel-cuda"]
    assert module == "hcnr_cli.main"
    command = typer.main.get_command(app)
    with command.make_context("hcnr", list(argv)) as ctx:  # parses, runs nothing
        group = ctx.command
        sub = group.get_command(ctx, argv[0])
        build = sub.get_command(ctx, argv[1])
        params = build.make_context(argv[1], argv[2:], parent=ctx).params
    assert params["model"] == "smollm2-135m" and params["no_progress"]
