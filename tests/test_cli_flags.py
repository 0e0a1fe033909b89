"""`hcnr repair`'s HCNR flags are generated from `RepairConfig`: one spec for the library,
the API and the CLI, so a field cannot be missing from the CLI or shown with a stale
default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core.config import RUN_OPTIONS, RepairConfig


def _repair_options() -> dict[str, object]:
    command = typer.main.get_command(app).commands["repair"]  # type: ignore[attr-defined]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize("field", list(RepairConfig.model_fields))
def test_every_repair_config_field_is_a_flag_showing_its_default(field: str) -> None:
    option = _repair_options().get(field)
    assert option is not None, f"RepairConfig.{field} has no `hcnr repair` flag"
    assert option.default is None  # "not given": --config and --set keep their precedence
    default = RepairConfig.model_fields[field].default
    assert f"[{default}]" in option.help.replace("\\[", "[")
    panel = "HCNR run options" if field in RUN_OPTIONS else "HCNR options"
    assert option.rich_help_panel == panel


def test_generated_flags_reach_the_repair(toy: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["repair", "--base", str(toy["base"]), "--finetuned", str(toy["adapter"])]
    args += ["--honesty", str(toy["honesty"]), "--task", str(toy["task"]), "--out", str(out)]
    # Fields that had no hand-written flag before the flags were generated:
    args += ["--column-budget", "fisher_mass", "--fisher-mass", "0.3"]
    args += ["--no-check-adapter-base-name", "--hessian-budget-mb", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "hcnr_report.json").read_text())["config"]
    assert config["column_budget"] == "fisher_mass" and config["fisher_mass"] == 0.3
    assert config["check_adapter_base_name"] is False and config["hessian_budget_mb"] == 1
    assert config["r_iw"] == RepairConfig().r_iw  # not given: the config's default


def test_a_bad_generated_flag_is_refused_by_the_config(toy: dict[str, Path], tmp_path: Path):
    args = ["repair", "--base", str(toy["base"]), "--finetuned", str(toy["adapter"])]
    args += ["--honesty", str(toy["honesty"]), "--task", str(toy["task"])]
    args += ["--out", str(tmp_path / "out"), "--hessian-inputs", "sideways"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "hessian_inputs" in result.output
    assert not (tmp_path / "out").exists()
