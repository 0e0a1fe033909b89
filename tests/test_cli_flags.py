"""`hcnr repair`'s HCNR flags are generated from `RepairConfig`: one spec for the library,
the API and the CLI, so a field cannot be missing from the CLI or shown with a stale
default; its run options, in their own panel, from `RunOptions`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hcnr_cli.main import app
from hcnr_core.config import RepairConfig, RunOptions


def _repair_options() -> dict[str, object]:
    command = typer.main.get_command(app).commands["repair"]  # type: ignore[attr-defined]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize(
    ("model", "field", "panel"),
    [(RepairConfig, f, "HCNR options") for f in RepairConfig.model_fields]
    + [(RunOptions, f, "Run options") for f in RunOptions.model_fields],
)
def test_every_repair_config_field_is_a_flag_showing_its_default(model, field, panel) -> None:
    option = _repair_options().get(field)
    assert option is not None, f"{model.__name__}.{field} has no `hcnr repair` flag"
    assert option.default is None  # "not given": --config and --set keep their precedence
    default = model.model_fields[field].default
    assert f"[{default}]" in option.help.replace("\\[", "[")
    assert option.rich_help_panel == panel


def test_generated_flags_reach_the_repair(toy: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["repair", "--method", "hcnr", "--base", str(toy["base"])]
    args += ["--finetuned", str(toy["adapter"])]
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


def test_a_config_file_holds_run_options_beside_the_spec(toy: dict[str, Path], tmp_path: Path):
    """`--config` keeps describing a whole run: run options sit under their own names
    beside the spec's fields, flags win over both, and the report records both."""
    config_file = tmp_path / "run.yaml"
    config_file.write_text("r_iw: 0.25\nlayerwise: true\nhessian_budget_mb: 7\ndevice: cpu\n")
    out = tmp_path / "out"
    args = ["repair", "--method", "hcnr", "--base", str(toy["base"])]
    args += ["--finetuned", str(toy["adapter"])]
    args += ["--honesty", str(toy["honesty"]), "--task", str(toy["task"]), "--out", str(out)]
    args += ["--config", str(config_file), "--hessian-budget-mb", "9", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "hcnr_report.json").read_text())["config"]
    assert config["r_iw"] == 0.25 and config["layerwise"] is True
    assert config["hessian_budget_mb"] == 9 and config["device"] == "cpu"


def test_a_run_option_a_method_does_not_run_with_is_refused(toy: dict[str, Path], tmp_path):
    args = ["repair", "--method", "hcnr", "--base", str(toy["base"])]
    args += ["--finetuned", str(toy["adapter"])]
    args += ["--honesty", str(toy["honesty"]), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--method", "rait", "--layerwise"])
    assert result.exit_code == 2
    assert "run option layerwise does not apply to RaitConfig" in result.output
    result = CliRunner().invoke(app, [*args, "--threads", "2"])  # HCNR: no thread option
    assert result.exit_code == 2 and "threads" in result.output
    assert not (tmp_path / "out").exists()


def test_a_bad_generated_flag_is_refused_by_the_config(toy: dict[str, Path], tmp_path: Path):
    args = ["repair", "--method", "hcnr", "--base", str(toy["base"])]
    args += ["--finetuned", str(toy["adapter"])]
    args += ["--honesty", str(toy["honesty"]), "--task", str(toy["task"])]
    args += ["--out", str(tmp_path / "out"), "--hessian-inputs", "sideways"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "hessian_inputs" in result.output
    assert not (tmp_path / "out").exists()
