"""clients/python (hcnr-client) is a distribution of its own: it installs into a fresh
virtualenv with httpx and pydantic only, and importing it pulls in neither the service
(api, worker, store: FastAPI, Celery, SQLAlchemy) nor the library (hcnr_core, torch)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"
PIP = [sys.executable, "-m", "pip", "--quiet"]
HEAVY = ("torch", "transformers", "fastapi", "celery", "sqlalchemy", "api", "hcnr_core")
CHECK = f"""
import importlib.util, sys
import hcnr_client
from hcnr_client import AsyncHCNRClient, HCNRClient
HCNRClient(api_key="k", base_url="http://127.0.0.1:9").close()
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
assert not loaded, f"importing hcnr_client loaded {{loaded}}"
print(hcnr_client.__file__)
for name in {HEAVY!r}:
    print(name, importlib.util.find_spec(name) is not None)
"""


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


def test_importing_the_client_loads_nothing_heavy():
    """In this venv everything is installed: the import itself must not reach for it."""
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, cwd="/", timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(CLIENT / "hcnr_client"))


def test_the_client_installs_alone_in_a_fresh_venv(tmp_path: Path):
    # A copy: building must not write into the tree (build/, egg-info) nor see the repo.
    source = tmp_path / "src"
    shutil.copytree(
        CLIENT, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("hcnr_client-*.whl")

    # No system site-packages; this venv's pip installs into it (seconds instead of
    # bootstrapping a pip of its own); httpx and pydantic come from the package index.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [*PIP, "--python", str(python), "install", str(wheel)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "list", "--format=freeze"],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=True,
    ).stdout.lower()
    assert "hcnr-client==0.1.0" in installed and "httpx==" in installed
    assert "pydantic==" in installed and "torch" not in installed

    result = subprocess.run(
        [str(python), "-c", CHECK],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(str(venv))  # the installed copy, not the tree
    assert lines[1:] == [f"{name} False" for name in HEAVY]
