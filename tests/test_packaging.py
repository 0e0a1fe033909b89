"""The library and CLI install and work without the service extra (issue 12, packaging):
pyproject.toml keeps the service's packages in `[service]`, and nothing in hcnr_core or
the CLI's library commands imports them; the compute stack is the `[compute]` extra, which
the API process does without (tests/test_one_house.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

from tests.blocked_imports import blocking_preamble

ROOT = Path(__file__).resolve().parents[1]
SERVICE_ONLY = {
    "fastapi",
    "uvicorn",
    "python-multipart",
    "httpx",
    "celery",
    "kombu",
    "redis",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "fsspec",
    "prometheus-client",
    "cryptography",
}
# The repair's compute stack: the `compute` extra, never a core dependency, so that the API
# image installs `.[service,s3]` without torch.
COMPUTE_ONLY = {
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "tokenizers",
    "accelerate",
    "trl",
    "datasets",
    "gguf",
    "matplotlib",
}
# The import names of the service's packages, and the service's own packages.
BLOCKED = (
    "fastapi uvicorn multipart python_multipart httpx celery kombu redis sqlalchemy alembic "
    "psycopg fsspec prometheus_client cryptography api worker store hcnr_client"
).split()

WITHOUT_SERVICE = (
    blocking_preamble(BLOCKED)
    + """
from typer.testing import CliRunner

import hcnr_core.pipeline, hcnr_core.baselines, hcnr_core.evaluation, hcnr_core.auto
from hcnr_cli.main import app

runner = CliRunner()
assert runner.invoke(app, ["repair", "--help"]).exit_code == 0
for argv in (["serve"], ["keys", "list"], ["jobs", "get", "job_x", "--api-key", "k"]):
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, (argv, result.output)
    assert "missing_dependency" in result.output, (argv, result.output)
print("hint:", result.output.strip().splitlines()[-1])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("ok")
"""
)


def _name(requirement: str) -> str:
    return requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()


def test_core_dependencies_leave_the_service_to_its_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    assert not core & SERVICE_ONLY, core & SERVICE_ONLY
    assert {_name(r) for r in project["optional-dependencies"]["service"]} == SERVICE_ONLY


def test_the_compute_stack_is_an_extra_with_torch_first_class():
    """`pip install '.[service,s3]'` (the API image) brings no torch; `.[compute]` brings
    the whole stack, with the torch range the README and bootstrap pin inside it."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in extras["dependencies"]}
    optional = extras["optional-dependencies"]
    assert not core & COMPUTE_ONLY, core & COMPUTE_ONLY
    assert {_name(r) for r in optional["compute"]} == COMPUTE_ONLY
    assert "torch>=2.4" in optional["compute"]
    api_image = core | {_name(r) for e in ("service", "s3") for r in optional[e]}
    assert not api_image & COMPUTE_ONLY, api_image & COMPUTE_ONLY
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'pip install -e ".[compute,service,dev,test]"' in bootstrap  # make test, make demo


def test_library_and_cli_work_without_the_service_packages():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVICE],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
    assert "hcnr[service]" in result.stdout or "hcnr-client" in result.stdout
