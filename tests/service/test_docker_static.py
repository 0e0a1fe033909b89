"""docker-compose.yml and the Dockerfiles, checked statically (no Docker engine here; the
same services run natively in test_redis_postgres_celery.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def substitute(value: str) -> str:
    """${VAR:?msg} / ${VAR:-default} as compose would, with required values filled in."""
    required = {"POSTGRES_PASSWORD": "pw", "HCNR_SECRET_KEY": "k" * 40}

    def replace(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        if op == ":?":
            return required[name]
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(:\?|:-)?([^}]*)\}", replace, value)


def test_services_and_healthchecks(compose: dict):
    services = compose["services"]
    assert {"redis", "postgres", "api", "worker", "minio", "migrate", "flower"} <= set(services)
    for name in ("redis", "postgres", "api", "worker", "minio", "flower"):
        assert "healthcheck" in services[name], name
        assert services[name]["healthcheck"]["test"], name
    assert services["minio"]["profiles"] == ["s3"]  # optional S3-compatible storage


def test_redis_is_durable_and_never_evicts(compose: dict):
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])


def test_worker_reserves_a_gpu_and_runs_one_process(compose: dict):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["environment"]["HCNR_WORKER_DEVICE"] == "cuda"
    dockerfile = (ROOT / worker["build"]["dockerfile"]).read_text()
    assert '"--concurrency", "1"' in dockerfile and '"--pool", "prefork"' in dockerfile
    assert "worker.celery_app" in dockerfile


def test_a_cpu_validator_consumes_the_validation_queue(compose: dict):
    """New jobs are validated on CPU (worker/validation.py), never on a GPU worker."""
    validator = compose["services"]["validator"]
    command = " ".join(validator["command"])
    assert "-Q hcnr.validation" in command and "worker.celery_app" in command
    assert "deploy" not in validator  # no GPU reserved
    assert validator["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert validator["build"]["target"] == "validator"  # the API's base + the compute stack
    assert validator["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = (ROOT / compose["services"]["worker"]["build"]["dockerfile"]).read_text()
    assert "hcnr.validation" not in gpu


def stages(name: str) -> dict[str, str]:
    """A Dockerfile's stages in order: `FROM ... AS name` -> its text ("" for an unnamed one)."""
    text = (ROOT / "docker" / name).read_text()
    found = {}
    for part in re.split(r"^FROM ", text, flags=re.M)[1:]:
        named = re.search(r"\sAS\s+(\w+)", part.splitlines()[0], re.I)
        found[named.group(1) if named else ""] = part
    return found


@pytest.mark.parametrize(
    ("name", "stage"), [("Dockerfile.worker", ""), ("Dockerfile.api", "validator")]
)
def test_compute_images_pin_torch_first_and_install_the_compute_extra(name: str, stage: str):
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pinned = re.search(r"TORCH_SPEC:-(torch==[0-9.]+)", bootstrap).group(1)
    text = stages(name)[stage]
    assert f'ARG TORCH_SPEC="{pinned}"' in text  # the version the tests ran on
    torch_at = text.index('"$TORCH_SPEC"')
    project_at = text.index('pip install ".[compute,service,s3]"')
    assert torch_at < project_at  # torch first: pip keeps it


def test_the_api_image_installs_no_compute_stack(compose: dict):
    """The API process loads no weights: its image (Dockerfile.api's default, last, target)
    installs `.[service,s3]`, neither torch nor the compute extra; the shared base stage
    installs nothing; compose builds the API and the migrations from that target."""
    found = stages("Dockerfile.api")
    assert list(found)[-1] == "api"  # `docker build -f docker/Dockerfile.api .` builds it
    api, base = found["api"], found["base"]
    assert re.findall(r'pip install "?[^"\s]*', api) == ['pip install ".[service,s3]']
    assert "torch" not in api.lower() and "compute" not in api
    assert "pip install" not in base and "torch" not in base.split("\n", 1)[1].lower()
    assert '"--factory", "api.app:create_app"' in api
    for service in ("api", "migrate"):
        assert compose["services"][service]["build"]["target"] == "api", service


def test_dependencies_wait_for_health(compose: dict):
    for name in ("api", "worker"):
        depends = compose["services"][name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_volumes_are_declared_and_shared(compose: dict):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in declared, (name, volume)
    api, worker = compose["services"]["api"]["volumes"], compose["services"]["worker"]["volumes"]
    assert "hcnr-data:/data" in api and "hcnr-data:/data" in worker  # local artifacts
    assert all(v.endswith(":ro") for v in api + worker if "/models" in v)


@pytest.mark.parametrize("service", ["api", "worker", "validator", "migrate"])
def test_environment_is_valid_production_settings(compose: dict, service: str):
    """Every HCNR_* variable is a Settings field and together they pass the production
    checks (PostgreSQL, real broker, secret, models root)."""
    from store.settings import Settings

    env = {k: substitute(str(v)) for k, v in compose["services"][service]["environment"].items()}
    fields = set(Settings.model_fields)
    for key in env:
        if key.startswith("HCNR_"):
            assert key.removeprefix("HCNR_").lower() in fields, key
    settings = Settings(
        **{k.removeprefix("HCNR_").lower(): v for k, v in env.items() if k.startswith("HCNR_")}
    )
    assert settings.env == "production"
    assert settings.db_url.startswith("postgresql+psycopg://")
    assert settings.celery_broker_url == "redis://redis:6379/0"


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfiles(name: str, compose: dict):
    text = (ROOT / "docker" / name).read_text()
    assert re.search(r"^FROM \S+", text, re.M)
    assert re.search(r"^USER (?!root)\w+", text, re.M)  # never runs as root
    assert "HEALTHCHECK" in text and "HF_HUB_OFFLINE=1" in text
    assert "trust_remote_code" not in text
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), copied
    builds = {s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s}
    assert f"docker/{name}" in builds


def test_api_image_command_is_importable():
    text = (ROOT / "docker" / "Dockerfile.api").read_text()
    target = re.search(r'"--factory", "([\w.]+):(\w+)"', text)
    module = __import__(target.group(1), fromlist=[target.group(2)])
    assert callable(getattr(module, target.group(2)))


def production_settings(compose: dict, service: str):
    from store.settings import Settings

    env = {k: substitute(str(v)) for k, v in compose["services"][service]["environment"].items()}
    return Settings(
        **{k.removeprefix("HCNR_").lower(): v for k, v in env.items() if k.startswith("HCNR_")}
    )


@pytest.mark.parametrize("service", ["worker", "validator"])
def test_workers_serve_their_metrics_on_the_compose_network(compose: dict, service: str):
    """worker/metrics.py: each worker's endpoint, reachable by a Prometheus on the compose
    network (bound to 0.0.0.0 in its container), never published on the host, where the
    replicas of a scaled worker would clash."""
    settings = production_settings(compose, service)
    assert settings.worker_metrics_port == 9808
    assert settings.worker_metrics_host == "0.0.0.0"
    assert compose["services"][service]["expose"] == ["9808"]
    assert "ports" not in compose["services"][service]


def test_flower_watches_the_workers_broker_behind_auth(compose: dict):
    """Flower (`--profile flower`) reads the task events of the broker the workers use,
    and can stop workers: it needs FLOWER_BASIC_AUTH and listens on the host's loopback."""
    from worker.celery_app import make_celery

    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    command = flower["command"][-1]
    broker = re.search(r"--broker=(\S+)", command).group(1)
    worker = production_settings(compose, "worker")
    assert broker == worker.celery_broker_url
    assert command.startswith('test -n "$$FLOWER_BASIC_AUTH" || {') and "exit 1; }" in command
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"
    assert flower["ports"] and all(p.startswith("127.0.0.1:") for p in flower["ports"])
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    for service in ("worker", "validator", "api"):  # the workers send, the API sends task-sent
        conf = make_celery(production_settings(compose, service)).conf
        assert conf.worker_send_task_events and conf.task_send_sent_event, service
