"""Issue 16: what a worker tells operators, on the real stack (Redis, PostgreSQL, a real
prefork `celery worker` and the threads-pool validation worker, `hcnr serve --no-worker
--no-validator` for the API):

- Celery task events, as Flower reads them (`celery.events.EventReceiver` on the broker):
  the repair task sent, received, started and succeeded, named, with the job id as its
  only argument;
- each worker's own Prometheus endpoint (worker/metrics.py): the stage histogram has
  exactly the stages the job row records, the outcome counter moves by one, the
  in-progress gauge follows a running job across the pool child and the main process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hcnr_client import HCNRClient
from prometheus_client.parser import text_string_to_metric_families

from hcnr_cli.serve_cmd import validator_command
from tests.service import flows
from tests.service import service_procs as procs
from tests.service.service_support import Models
from worker.celery_app import TASK_NAME, VALIDATION_TASK

GPU, VALIDATOR = "wobs", "vobs"  # node names of this module's workers


@dataclass
class Stack:
    alice: HCNRClient
    key: str
    redis_url: str
    worker_port: int
    validator_port: int


@pytest.fixture(scope="module")
def stack(
    models: Models, redis_url: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("observability")
    env = procs.service_env(
        env="test",
        data_dir=data_dir,
        models_root=models.root,
        database_url=postgres_url,
        broker_url=redis_url,
        lease_seconds=6,
        heartbeat_seconds=1,
        reconcile_seconds=1,
    )
    key = procs.create_key(env, "alice")
    api, url = procs.start_api(env, data_dir / "api.log", worker=False, validator=False)
    worker_port, validator_port = procs.free_port(), procs.free_port()
    gpu = procs.start_celery_worker(
        {**env, "HCNR_WORKER_METRICS_PORT": str(worker_port)}, data_dir / "worker.log", GPU
    )
    validator = procs.start_celery_worker(
        {**env, "HCNR_WORKER_METRICS_PORT": str(validator_port)},
        data_dir / "validator.log",
        VALIDATOR,
        validator_command(2, name=f"{VALIDATOR}@%h"),
    )
    client = HCNRClient(base_url=url, api_key=key)
    try:
        yield Stack(client, key, redis_url, worker_port, validator_port)
    finally:
        client.close()
        for process in (gpu, validator, api):
            procs.stop(process)


# --- helpers ----------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a worker's endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: dict, name: str, label: str) -> dict[str, float]:
    """{value of `label`: sample value} of every sample called `name`."""
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name}


def create_job(client: HCNRClient, models: Models) -> str:
    files = flows.upload_inputs(client, models.honesty, models.task)
    return client.repair_jobs.create(
        method="hcnr",
        base="path:base",
        finetuned="path:finetuned-adapter",
        honesty_file=files["honesty"],
        task_file=files["task"],
    ).id


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


class Events:
    """The broker's event stream, captured in a thread (what Flower consumes)."""

    def __init__(self, broker_url: str):
        from celery import Celery

        self.app = Celery(broker=broker_url)
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Events:
        from celery.events import EventReceiver

        self.connection = self.app.connection_for_read()
        self.receiver = EventReceiver(self.connection, handlers={"*": self._on_event}, app=self.app)
        self.thread = threading.Thread(
            target=self.receiver.capture,
            kwargs={"limit": None, "timeout": None, "wakeup": False},
            daemon=True,
        )
        self.thread.start()
        # A worker heartbeat seen: our queue is bound, nothing sent after this is missed.
        wait_for(lambda: self.of("worker-heartbeat", hostname=f"{GPU}@"), 30, "a heartbeat")
        return self

    def __exit__(self, *_: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)
        self.connection.release()

    def _on_event(self, event: dict) -> None:
        with self._lock:
            self.events.append(dict(event))

    def of(self, type_: str, hostname: str = "", **fields: object) -> list[dict]:
        with self._lock:
            events = list(self.events)
        return [
            e
            for e in events
            if e["type"] == type_
            and e.get("hostname", "").startswith(hostname)
            and all(e.get(k) == v for k, v in fields.items())
        ]

    def task(self, name: str, job_id: str) -> str:
        """The uuid of the task `name` sent for `job_id` (exactly one)."""
        sent = [
            e for e in self.of("task-sent", name=name) if ast.literal_eval(e["args"]) == [job_id]
        ]
        assert len(sent) == 1, sent
        return sent[0]["uuid"]


# --- Celery events ------------------------------------------------------------------------


def test_task_events_show_each_job_as_flower_would(stack: Stack, models: Models):
    with Events(stack.redis_url) as events:
        job_id = create_job(stack.alice, models)
        job = stack.alice.repair_jobs.wait(job_id, timeout=180, poll_interval=0.3)
        assert job.status == "succeeded", job.error
        repair = events.task(TASK_NAME, job_id)  # sent by the validation worker
        wait_for(lambda: events.of("task-succeeded", uuid=repair), 20, "task-succeeded")
        validation = events.task(VALIDATION_TASK, job_id)  # sent by the API
    lifecycle = ("task-sent", "task-received", "task-started", "task-succeeded")
    for uuid, worker in ((repair, GPU), (validation, VALIDATOR)):
        seen = {kind: events.of(kind, uuid=uuid) for kind in lifecycle}
        assert all(len(seen[kind]) == 1 for kind in lifecycle), seen
        # received -> started -> succeeded (task-sent is published just after the task
        # message itself, so a fast worker may receive the task first)
        stamps = [seen[kind][0]["timestamp"] for kind in lifecycle[1:]]
        assert stamps == sorted(stamps)
        for kind in lifecycle[1:]:  # run by the worker of its queue
            assert seen[kind][0]["hostname"].startswith(f"{worker}@"), seen[kind]
    received = events.of("task-received", uuid=repair)[0]
    assert received["name"] == TASK_NAME
    assert ast.literal_eval(received["args"]) == [job_id] and received["kwargs"] == "{}"
    assert events.of("task-succeeded", uuid=repair)[0]["result"] == "'succeeded'"
    assert events.of("task-sent", uuid=validation)[0]["queue"] == "hcnr.validation"
    # What Flower shows carries job ids only: never the caller's key.
    assert stack.key not in json.dumps(events.events, default=str)
    for event in events.events:
        if event["type"] in ("task-sent", "task-received"):
            assert ast.literal_eval(event["args"]) == [job_id], event


# --- worker metrics -----------------------------------------------------------------------


def test_stage_histogram_and_outcome_match_the_job_row(stack: Stack, models: Models):
    before = scrape(stack.worker_port)
    validator_before = scrape(stack.validator_port)
    job_id = create_job(stack.alice, models)
    job = stack.alice.repair_jobs.wait(job_id, timeout=180, poll_interval=0.3)
    assert job.status == "succeeded", job.error
    after = scrape(stack.worker_port)

    stages = job.stage_seconds
    assert {"fisher_task", "fisher_honesty", "select", "save"} <= set(stages)  # the pipeline
    moved = {
        stage: n - labelled(before, "hcnr_worker_stage_seconds_count", "stage").get(stage, 0)
        for stage, n in labelled(after, "hcnr_worker_stage_seconds_count", "stage").items()
    }
    assert {stage: n for stage, n in moved.items() if n} == dict.fromkeys(stages, 1.0)
    for stage, seconds in stages.items():
        grew = value(after, "hcnr_worker_stage_seconds_sum", stage=stage, method="hcnr") - value(
            before, "hcnr_worker_stage_seconds_sum", stage=stage, method="hcnr"
        )
        assert grew == pytest.approx(seconds, abs=1e-6), stage

    finished = "hcnr_worker_jobs_finished_total"
    for outcome in ("succeeded", "failed", "cancelled", "lost", "error"):
        delta = value(after, finished, method="hcnr", outcome=outcome) - value(
            before, finished, method="hcnr", outcome=outcome
        )
        assert delta == (1.0 if outcome == "succeeded" else 0.0), outcome
    assert sum(labelled(after, "hcnr_worker_jobs_in_progress", "stage").values()) == 0

    # The peak resident set of the pool child that ran the job (torch and two toy
    # models loaded), below what this machine has.
    peak = value(
        after, "hcnr_worker_job_peak_memory_bytes", device="cpu", measure="process_peak_rss"
    )
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 100e6 < peak < total, peak

    validations = scrape(stack.validator_port)
    queued = value(validations, "hcnr_validation_seconds_count", outcome="queued") - value(
        validator_before, "hcnr_validation_seconds_count", outcome="queued"
    )
    assert queued == 1.0
    assert value(validations, "hcnr_validation_seconds_sum", outcome="queued") > 0


def test_in_progress_gauge_follows_a_running_job_and_its_cancel(stack: Stack, models: Models):
    """The gauge is written by the pool child and served by the main process."""
    before = scrape(stack.worker_port)
    job_id = flows.slow_job(stack.alice, models)
    flows.wait_running(stack.alice, job_id)

    def one_in_progress() -> bool:
        samples = scrape(stack.worker_port)
        gauge = labelled(samples, "hcnr_worker_jobs_in_progress", "stage")
        stage = stack.alice.repair_jobs.retrieve(job_id).stage
        return sum(gauge.values()) == 1 and gauge.get(stage) == 1

    wait_for(one_in_progress, 60, "the running job's stage in hcnr_worker_jobs_in_progress")
    stack.alice.repair_jobs.cancel(job_id)
    job = stack.alice.repair_jobs.wait(job_id, timeout=120, poll_interval=0.2)
    assert job.status == "cancelled"
    after = scrape(stack.worker_port)
    assert sum(labelled(after, "hcnr_worker_jobs_in_progress", "stage").values()) == 0
    finished = "hcnr_worker_jobs_finished_total"
    cancelled = value(after, finished, method="hcnr", outcome="cancelled") - value(
        before, finished, method="hcnr", outcome="cancelled"
    )
    assert cancelled == 1.0
    # A cancelled run's stages are those it completed (what its row records).
    done = {
        stage
        for stage, n in labelled(after, "hcnr_worker_stage_seconds_count", "stage").items()
        if n - labelled(before, "hcnr_worker_stage_seconds_count", "stage").get(stage, 0)
    }
    assert done == set(job.stage_seconds)


def test_the_endpoint_is_off_without_a_port(tmp_path: Path):
    """Unset HCNR_WORKER_METRICS_PORT: no exporter, no multiprocess directory."""
    from store.settings import Settings
    from worker import metrics

    assert Settings().worker_metrics_port is None
    assert metrics.start_exporter(Settings(data_dir=tmp_path)) is None
    assert metrics.MULTIPROC_ENV not in os.environ


def test_task_events_only_where_the_broker_carries_them(tmp_path: Path):
    """The embedded broker keeps its bindings in each process: events there would reach
    no one (and Flower cannot read it), so they are off; on Redis they are on unless
    HCNR_TASK_EVENTS=false."""
    from store.settings import Settings
    from worker.celery_app import make_celery

    def events(**settings) -> tuple[bool, bool]:
        conf = make_celery(Settings(data_dir=tmp_path, **settings)).conf
        return conf.worker_send_task_events, conf.task_send_sent_event

    assert events() == (False, False)  # sqla+sqlite
    assert events(broker_url="redis://127.0.0.1:6379/0") == (True, True)
    assert events(broker_url="redis://127.0.0.1:6379/0", task_events=False) == (False, False)


def test_a_killed_process_leaves_the_in_progress_gauge(tmp_path: Path):
    """A pool child SIGKILLed mid-job (OOM, a kill) never ran its cleanup: the main
    process's collector drops its live gauge, and keeps its counters."""
    import signal
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, generate_latest

    from worker.metrics import LiveCollector

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from worker.metrics import metrics\n"
            "m = metrics()\n"
            "m.in_progress.labels('fisher_task').inc()\n"
            "m.finished.labels('hcnr', 'succeeded').inc()\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n",
        ],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        registry = CollectorRegistry()
        LiveCollector(registry, str(tmp_path))

        def samples() -> dict:
            text = generate_latest(registry).decode()
            return {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        running = samples()
        assert value(running, "hcnr_worker_jobs_in_progress", stage="fisher_task") == 1
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        after = samples()
        assert labelled(after, "hcnr_worker_jobs_in_progress", "stage") == {}
        finished = "hcnr_worker_jobs_finished_total"
        assert value(after, finished, method="hcnr", outcome="succeeded") == 1
    finally:
        child.kill()
        child.wait()


def free_port_pair() -> int:
    """A port P with P + 1 free too (`hcnr serve`: the validation worker takes P + 1)."""
    import socket

    for _ in range(50):
        port = procs.free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no pair of free ports")


@pytest.mark.slow  # ~50 s on 2 cores: `hcnr serve` with two workers on the polling broker
def test_hcnr_serve_exports_both_workers(models: Models, tmp_path: Path):
    """Embedded mode (SQLite, the kombu SQLAlchemy broker): `hcnr serve`'s prefork worker
    serves HCNR_WORKER_METRICS_PORT and its validation worker the next port."""
    port = free_port_pair()
    env = procs.service_env(
        env="test", data_dir=tmp_path, models_root=models.root, worker_metrics_port=port
    )
    key = procs.create_key(env, "alice")
    process, url = procs.start_api(env, tmp_path / "serve.log")
    try:
        with HCNRClient(base_url=url, api_key=key) as client:
            wait_for(lambda: _answers(port) and _answers(port + 1), 60, "both endpoints")
            job_id = create_job(client, models)
            job = client.repair_jobs.wait(job_id, timeout=180, poll_interval=0.3)
        assert job.status == "succeeded", job.error
        gpu, validator = scrape(port), scrape(port + 1)
        finished = "hcnr_worker_jobs_finished_total"
        assert value(gpu, finished, method="hcnr", outcome="succeeded") == 1
        assert labelled(gpu, "hcnr_worker_stage_seconds_count", "stage") == dict.fromkeys(
            job.stage_seconds, 1.0
        )
        assert value(validator, "hcnr_validation_seconds_count", outcome="queued") == 1
        assert not labelled(validator, finished, "outcome")  # each worker its own numbers
    finally:
        procs.stop(process)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _touch(n: int) -> bytearray:
    """n bytes, every page written (resident)."""
    block = bytearray(n)
    block[::4096] = b"\1" * len(block[::4096])
    return block


def test_peak_rss_is_the_jobs_not_the_processes():
    """The host peak is reset at the job's start (VmHWM through /proc/self/clear_refs):
    a big allocation before the job does not count, one during the job does."""
    from worker.metrics import RSS, JobTracker, peak_memory

    before = _touch(600 * 2**20)
    del before  # freed (mmap'd): the process's lifetime peak stays above 600 MiB
    tracker = JobTracker("hcnr", ["cpu"])
    assert tracker.rss_reset
    # The test process already holds what earlier tests loaded: measure from its size now.
    base = _resident_bytes()
    during = _touch(100 * 2**20)
    [(device, measure, peak)] = peak_memory(["cpu"], tracker.rss_reset)
    del during
    assert (device, measure) == ("cpu", RSS)
    assert base + 90 * 2**20 < peak < base + 300 * 2**20, (base, peak)  # not base + 600


def _resident_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


@pytest.mark.gpu
def test_peak_cuda_memory_is_the_jobs():
    """torch.cuda.max_memory_allocated, reset at the job's start, labelled by index."""
    import torch

    from worker.metrics import CUDA, JobTracker, peak_memory

    before = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    del before
    tracker = JobTracker("hcnr", ["cuda"])
    during = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    cuda = [v for v in peak_memory(["cuda"], tracker.rss_reset) if v[1] == CUDA]
    del during
    assert [(d, m) for d, m, _ in cuda] == [(f"cuda:{torch.cuda.current_device()}", CUDA)]
    assert 64 * 2**20 <= cuda[0][2] < 512 * 2**20


def test_a_taken_metrics_port_stops_the_worker(tmp_path: Path):
    """Celery swallows a signal handler's error: the worker must not run unmonitored."""
    import socket
    import subprocess

    from hcnr_cli.serve_cmd import worker_command

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = procs.service_env(data_dir=tmp_path, worker_metrics_port=port)
        result = subprocess.run(
            worker_command(), env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout + result.stderr


def test_stale_metrics_directories_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A worker SIGKILLed never removed its directory: the next one to start does, and
    leaves those of workers still alive."""
    import tempfile

    from worker import metrics

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = _exited_pid()
    alive = os.getppid()
    for pid in (dead, alive, os.getpid()):
        (tmp_path / f"{metrics.DIR_PREFIX}{pid}-x1").mkdir()
    (tmp_path / "unrelated").mkdir()
    metrics._sweep_stale_directories(os.getpid())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{metrics.DIR_PREFIX}{alive}-x1",
        "unrelated",
    ]


def _exited_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
