"""Issue 12's "one of each": one rule for an adapter's base in every entry point, one device
rule set, one dtype table, a torch-free API process and no import cycle in any package."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tests.blocked_imports import blocking_preamble
from tests.test_cli_imports import find_cycle

ROOT = Path(__file__).resolve().parents[1]


# --- one base-resolution rule ----------------------------------------------------------------


def _renamed_adapter(toy: dict[str, Path], tmp_path: Path, named: str) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(toy["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = named
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_an_adapter_finds_its_named_local_base_in_every_entry_point(toy):
    from hcnr_core.checkpoint import inspect_checkpoint, resolve_adapter_base

    found = resolve_adapter_base(inspect_checkpoint(toy["adapter"]), None)
    assert found.path.resolve() == toy["base"].resolve() and found.kind == "full"


@pytest.mark.parametrize("named", ["org/base", ""])  # a hub id (the toy's name), none
def test_an_adapter_without_a_local_base_is_refused_alike_everywhere(toy, tmp_path, named):
    """Repair-side baselines and eval (hence probe and auto, which load through it) give
    the same answer for an adapter whose base is a hub id or unnamed: pass the base."""
    from hcnr_core.baselines import check_baseline
    from hcnr_core.config import RaitConfig
    from hcnr_core.errors import CheckpointError
    from hcnr_core.evaluation import load_for_eval

    adapter = _renamed_adapter(toy, tmp_path, named)
    messages = []
    with pytest.raises(CheckpointError) as raised:
        load_for_eval(adapter, None, "cpu")
    messages.append(str(raised.value))
    with pytest.raises(CheckpointError) as raised:
        check_baseline("rait", None, adapter, toy["honesty"], RaitConfig())
    messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert "needs its base model" in messages[0] and repr(named) in messages[0]
    # Given the base, both accept it.
    model, _ = load_for_eval(adapter, toy["base"], "cpu")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert check_baseline("rait", toy["base"], adapter, toy["honesty"], RaitConfig()) == []


def test_an_adapter_as_base_is_refused(toy):
    from hcnr_core.checkpoint import inspect_checkpoint, resolve_adapter_base
    from hcnr_core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="must be a full model"):
        resolve_adapter_base(inspect_checkpoint(toy["adapter"]), toy["adapter"])


# --- one device rule set ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["cpu", "cuda", "cuda:1", "mps", " cuda:0", "gpu", "cuda:x", "CPU", "cuda:0,cuda:0"]
)
def test_baselines_accept_exactly_the_single_devices_a_repair_accepts(spec: str):
    from pydantic import ValidationError

    from hcnr_core.config import RaitConfig, RepairConfig, RunOptions

    try:
        options = RunOptions(device=spec)
    except ValidationError:
        options = None
    repair = options and options.check_for(RepairConfig).device
    baseline = options and options.check_for(RaitConfig).device
    assert baseline == repair


def test_baselines_refuse_a_device_list():
    from hcnr_core.config import DpoConfig, RepairConfig, RunOptions
    from hcnr_core.errors import InvalidConfigError

    two = RunOptions(device="cuda:0,cuda:1")
    assert two.check_for(RepairConfig).device == "cuda:0,cuda:1"
    with pytest.raises(InvalidConfigError, match="one device"):
        two.check_for(DpoConfig)


def test_a_worker_with_several_devices_refuses_baseline_jobs_at_creation(tmp_path: Path):
    """The worker's run options are checked against the job's method when it is created:
    RAIT/DPO on a worker with replicas fail at POST (invalid_hyperparameters), not later."""
    from api.errors import APIError
    from api.schemas import RepairJobCreate
    from api.services import repair_config
    from store.settings import Settings

    settings = Settings(env="test", data_dir=tmp_path, worker_device="cpu,cpu")
    body = {"method": "hcnr", "base": "path:b", "finetuned": "path:f"}
    body |= {"honesty_file": "a", "task_file": "b"}
    assert repair_config(RepairJobCreate(**body), settings).r_iw == 0.5  # HCNR: replicas
    with pytest.raises(APIError, match="one device") as refused:
        repair_config(RepairJobCreate(**{**body, "method": "rait"}), settings)
    assert refused.value.code == "invalid_hyperparameters"
    assert "device" not in repair_config(RepairJobCreate(**body), settings).model_dump()


# --- one dtype table -------------------------------------------------------------------------


def test_the_config_the_loader_and_the_estimate_read_one_dtype_table():
    import torch

    from hcnr_core import checkpoint, estimate, formats
    from hcnr_core.config import DType

    assert set(typing.get_args(DType)) == {"auto", *formats.COMPUTE_DTYPES}
    assert {n: getattr(torch, n) for n in formats.COMPUTE_DTYPES} == checkpoint.COMPUTE_DTYPES
    for code, name in formats.SAFETENSORS_DTYPES.items():
        # what the repair loads a stored dtype as, and what the estimate counts for it
        assert checkpoint._DTYPES[code] == getattr(torch, name)
        assert formats.DTYPE_BYTES[name] == getattr(torch, name).itemsize
    assert estimate.DTYPE_BYTES is formats.DTYPE_BYTES
    assert estimate.SAFETENSORS_DTYPES is formats.SAFETENSORS_DTYPES


# --- the API process stays torch-free --------------------------------------------------------


@pytest.mark.parametrize(
    "module", ["api.app", "store.remote_models", "hcnr_core.estimate", "hcnr_core.auto"]
)
def test_the_api_process_imports_no_torch(module: str):
    """What the API imports (auto: to resolve a job's candidates) leaves out the compute
    stack, and celery, which only the workers' processes import."""
    code = (
        f"import sys, {module}\n"
        f"heavy = sorted(m for m in {(*COMPUTE_STACK, 'celery')!r} if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


# What the API image leaves out (pyproject.toml's `compute` extra and what it pulls in): the
# API process must serve without any of it.
COMPUTE_STACK = (
    "torch transformers peft trl datasets accelerate gguf matplotlib safetensors tokenizers "
    "huggingface_hub numpy"
).split()

SERVE_WITHOUT_COMPUTE = """
import json
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from store import repositories
from store.db import session_scope
from store.settings import Settings

data_dir, models_root, honesty, task, adapter = map(Path, sys.argv[1:])
settings = Settings(env="test", data_dir=data_dir, models_root=models_root)
# The served API: validation is the validator's (Celery), never this process's.
app = create_app(settings, enqueue=lambda _id: None, validate=lambda _id: None)
with session_scope(app.state.session_factory) as session:
    _, key = repositories.create_api_key(session, "alice")
client = TestClient(app, headers={{"Authorization": f"Bearer {{key}}"}})
assert client.get("/healthz").status_code == 200
ids = {{}}
for purpose, path in (("honesty", honesty), ("task", task)):
    sent = {{"file": (path.name, path.read_bytes(), "application/jsonl")}}
    answer = client.post("/v1/files", files=sent, data={{"purpose": purpose}})
    assert answer.status_code == 201, answer.text
    ids[purpose] = answer.json()["id"]
body = {{"base": "path:base", "finetuned": f"path:{{adapter.name}}",
        "honesty_file": ids["honesty"], "task_file": ids["task"]}}
for method, values in (("hcnr", {{"compensation": "exact"}}), ("rait", {{"epochs": 1.0}}),
                       ("dpo", {{}}), ("auto", {{"max_domain_drop": 5.0}})):
    job = {{**body, "method": method, "hyperparameters": values}}
    estimate = client.post("/v1/repair-jobs/estimate", json=job)
    assert estimate.status_code == 200, (method, estimate.text)
    created = client.post("/v1/repair-jobs", json=job)
    assert created.status_code == 201, (method, created.text)
    assert client.get(f"/v1/repair-jobs/{{created.json()['id']}}").status_code == 200
assert client.get("/v1/repair-jobs").json()["data"]
assert client.get("/ui/", follow_redirects=True).status_code == 200
leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
assert not leaked, leaked
print("served")
"""


def test_the_api_serves_jobs_and_estimates_without_the_compute_stack(toy, tmp_path: Path):
    """The API image installs `.[service,s3]` without the compute extra (docker/
    Dockerfile.api): with every compute package blocked, the API still starts, takes
    uploads, estimates and creates jobs of every method (auto's candidates included) and
    renders the dashboard, and none of those packages was imported."""
    script = blocking_preamble(COMPUTE_STACK) + SERVE_WITHOUT_COMPUTE.format()
    argv = [tmp_path / "data", toy["base"].parent, toy["honesty"], toy["task"], toy["adapter"]]
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "served" in result.stdout


# --- no import cycle -------------------------------------------------------------------------


def module_graph(package: Path) -> dict[str, set[str]]:
    """{dotted module: the package's modules it imports}, sub-packages included, from every
    import statement anywhere in a module (function-level imports make cycles too)."""
    top = package.name
    files: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(dotted: str) -> str | None:  # the module a dotted name lives in
        while dotted and dotted not in files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                if module.split(".")[0] != top:
                    continue
                # `from pkg import sub` names a module; `from pkg import name` its package
                targets = [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {o for t in targets if (o := owner(t))}
        graph[name] = edges - {name}
    return graph


PACKAGES = ["hcnr_core", "hcnr_cli", "api", "worker", "store", "bench"]
# No edge is allowed: `get_method` lives in `hcnr_core.registry`, apart from `methods`
# (which `auto` imports); an exception would be listed here as (source, target).
ALLOWED_EDGES: set[tuple[str, str]] = set()


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_has_an_import_cycle(package: str):
    graph = module_graph(ROOT / package)
    assert len(graph) > 3
    for source, target in ALLOWED_EDGES:
        if source in graph:
            assert target in graph[source], f"{source} -> {target} is gone: drop the allowance"
            graph[source].discard(target)
    assert find_cycle(graph) is None


def test_the_check_sees_a_cycle_through_a_subpackage_and_a_function(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub.b import f\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    assert find_cycle(module_graph(package)) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "b.py").write_text("def f():\n    import pkg.c\n")
    assert find_cycle(module_graph(package)) is None
