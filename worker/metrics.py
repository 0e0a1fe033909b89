"""Prometheus metrics of a Celery worker, served by the worker itself (issue 16).

The API's `/metrics` (api/metrics.py) counts jobs by status from the database; what only
the worker knows is here: jobs in progress by stage, how long each stage took, how jobs
ended, the peak memory of the last job, and how long validations take.

Celery's prefork pool runs each job in a pool child (and `HCNR_WORKER_MAX_TASKS_PER_CHILD=1`
replaces that child after every job), so the numbers cannot live in one process's memory:
prometheus_client's multiprocess mode is used. The worker's main process creates a
directory of its own at start (`celeryd_init`), every process of that worker writes its
values to mmap files there, and the main process serves their merge on
`HCNR_WORKER_METRICS_PORT` (off when unset). Counters and histograms of children that
exited still count (a counter must not go down because a child was replaced); the
in-progress gauge only sums live processes: the files of a dead child (even a SIGKILLed
one) are dropped at the next scrape. The validation worker runs the threads pool (one
process): the same code serves it.

Metrics are recorded whether or not they are served (in memory when no port is set);
recording never fails a job.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("hcnr.worker.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Stages last from milliseconds (the toy) to tens of minutes (an 8B model on a small GPU).
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)
VALIDATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RSS = "process_peak_rss"  # VmHWM of the process that ran the job, reset at its start
RSS_LIFETIME = "process_peak_rss_lifetime"  # the reset was refused: peak since the start
CUDA = "cuda_max_memory_allocated"  # torch.cuda.max_memory_allocated, reset at job start


class WorkerMetrics:
    """The metric objects of one process (created lazily: after the fork, with the
    multiprocess directory already set by the main process)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: in multiprocess mode the main process reads the files, and in
        # memory nothing else may register these names twice.
        self.in_progress = Gauge(
            "hcnr_worker_jobs_in_progress",
            "Repair jobs this worker is running, by the stage they are in",
            ["stage"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self.stage_seconds = Histogram(
            "hcnr_worker_stage_seconds",
            "Seconds per pipeline stage of finished jobs (the job's recorded stage_seconds)",
            ["stage", "method"],
            buckets=STAGE_BUCKETS,
            registry=None,
        )
        self.job_seconds = Histogram(
            "hcnr_worker_job_seconds",
            "Wall-clock seconds of a job run on this worker, by outcome",
            ["method", "outcome"],
            buckets=JOB_BUCKETS,
            registry=None,
        )
        self.finished = Counter(
            "hcnr_worker_jobs_finished",
            "Job runs finished on this worker, by outcome (lost: the lease went to another "
            "attempt before the outcome could be recorded)",
            ["method", "outcome"],
            registry=None,
        )
        self.peak_memory = Gauge(
            "hcnr_worker_job_peak_memory_bytes",
            f"Peak memory of the last job, by device; measure={CUDA} on a GPU, "
            f"{RSS} (peak resident set of the job's process) on the host",
            ["device", "measure"],
            multiprocess_mode="mostrecent",  # the last job's, even if its child is gone
            registry=None,
        )
        self.validation_seconds = Histogram(
            "hcnr_validation_seconds",
            "Seconds of a validation task, by outcome (queued, failed, skipped: the job "
            "was no longer validating, error: the task raised)",
            ["outcome"],
            buckets=VALIDATION_BUCKETS,
            registry=None,
        )
        self.validation_failures = Counter(
            "hcnr_validation_failures",
            "Jobs failed by validation, by error code",
            ["code"],
            registry=None,
        )


_metrics: dict[int, WorkerMetrics] = {}


def metrics() -> WorkerMetrics:
    """This process's metrics (one set per pid: a forked child makes its own)."""
    pid = os.getpid()
    if pid not in _metrics:
        _metrics[pid] = WorkerMetrics()
    return _metrics[pid]


def _quietly(what: str):
    """Metrics never fail a job: an error is logged and the job goes on."""

    def decorate(function):
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except Exception:
                log.exception("worker metrics: %s failed", what)
                return None

        return wrapped

    return decorate


# --- one job ----------------------------------------------------------------------------


class JobTracker:
    """The metrics of one job run: its stage in the in-progress gauge, then at the end
    its outcome, its stages' seconds and its peak memory."""

    def __init__(self, method: str, devices: Iterable[str]):
        self.method, self.devices = method, list(devices)
        self.stage_name: str | None = None
        self.completed: dict[str, float] = {}  # stages done, as the progress recorder has them
        self.started = time.monotonic()
        self.rss_reset = _reset_peak_memory(self.devices)

    @_quietly("stage")
    def stage(self, name: str, completed: Mapping[str, float] | None = None) -> None:
        if completed is not None:
            self.completed = dict(completed)
        gauge = metrics().in_progress
        if self.stage_name is not None:
            gauge.labels(self.stage_name).dec()
        gauge.labels(name).inc()
        self.stage_name = name

    @_quietly("finish")
    def finish(self, outcome: str, stage_seconds: Mapping[str, float] | None = None) -> None:
        """`stage_seconds`: the stages the job's row records (a succeeded job's report);
        None: those the progress recorder completed (a failed or cancelled run)."""
        m = metrics()
        if stage_seconds is None:
            stage_seconds = self.completed
        if self.stage_name is not None:
            m.in_progress.labels(self.stage_name).dec()
            self.stage_name = None
        for stage, seconds in stage_seconds.items():
            m.stage_seconds.labels(stage, self.method).observe(float(seconds))
        m.finished.labels(self.method, outcome).inc()
        m.job_seconds.labels(self.method, outcome).observe(time.monotonic() - self.started)
        for device, measure, value in peak_memory(self.devices, self.rss_reset):
            m.peak_memory.labels(device, measure).set(value)


def _reset_peak_memory(devices: list[str]) -> bool:
    """Start the job's peak-memory window; True when the host peak (VmHWM) was reset.
    CUDA stats are reset only where CUDA is already up: a fresh child's are zero anyway,
    and CUDA must never be initialised just for a metric."""
    torch = sys.modules.get("torch")
    if torch is not None and _cuda_up(torch):
        for device in _cuda_devices(devices):
            try:
                torch.cuda.reset_peak_memory_stats(device)
            except Exception:
                log.debug("could not reset the CUDA peak of %s", device, exc_info=True)
    try:  # Linux: "5" resets the peak resident set (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(devices: list[str], rss_reset: bool) -> list[tuple[str, str, float]]:
    """(device, measure, bytes) of the job that just ran in this process."""
    values: list[tuple[str, str, float]] = []
    hwm = _vm_hwm_bytes() if rss_reset else None
    if hwm is not None:
        values.append(("cpu", RSS, float(hwm)))
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        values.append(("cpu", RSS_LIFETIME, float(peak)))
    torch = sys.modules.get("torch")
    if torch is not None and _cuda_up(torch):
        for device in _cuda_devices(devices):
            values.append((device, CUDA, float(torch.cuda.max_memory_allocated(device))))
    return values


def _vm_hwm_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) * 1024 if match else None


def _cuda_up(torch: Any) -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_initialized())
    except Exception:
        return False


def _cuda_devices(devices: list[str]) -> list[str]:
    """'cuda' is the current device, by index: one label per physical GPU."""
    torch = sys.modules["torch"]
    names = []
    for name in devices:
        if name == "cuda":
            name = f"cuda:{torch.cuda.current_device()}"
        if name.startswith("cuda:") and name not in names:
            names.append(name)
    return names


# --- validations ------------------------------------------------------------------------


@_quietly("validation")
def validation_done(outcome: str, seconds: float, code: str | None = None) -> None:
    m = metrics()
    m.validation_seconds.labels(outcome).observe(seconds)
    if outcome == "failed" and code:
        m.validation_failures.labels(code).inc()


# --- the exporter (the worker's main process) ---------------------------------------------


class Exporter:
    """The HTTP endpoint of one worker and its multiprocess directory."""

    def __init__(self, port: int, host: str):
        from prometheus_client import CollectorRegistry, values
        from prometheus_client.exposition import start_http_server

        self.pid = os.getpid()
        _sweep_stale_directories(self.pid)
        self.directory = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{self.pid}-"))
        os.environ[MULTIPROC_ENV] = str(self.directory)  # inherited by the pool children
        if not getattr(values.ValueClass, "_multiprocess", False):
            # prometheus_client chose its value class when first imported; if that was
            # before the variable was set, switch it now (before the pool forks).
            values.ValueClass = values.MultiProcessValue()
        _metrics.clear()  # none were made in memory that should now be in the files
        registry = CollectorRegistry()
        LiveCollector(registry, str(self.directory))
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self.address = (host, self.server.server_port)
        log.info("worker metrics on http://%s:%d/metrics", host, self.server.server_port)

    def close_in_child(self) -> None:
        """A forked pool child holds a copy of the listening socket: close it there, so
        the port is released when the main process goes, whatever its children do."""
        if os.getpid() != self.pid:  # never the main process's own (threads, solo pools)
            self.server.socket.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


DIR_PREFIX = "hcnr-worker-metrics-"


def _sweep_stale_directories(own_pid: int) -> None:
    """Remove the directories of workers that died without their shutdown (SIGKILL): the
    pid in the name is gone, or it is this process's (a restarted container's pid 1)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{DIR_PREFIX}*-*")):
        pid = path.removeprefix(os.path.join(tempfile.gettempdir(), DIR_PREFIX)).split("-")[0]
        if pid.isdigit() and (int(pid) == own_pid or not _alive(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def _live_collector_base():
    from prometheus_client.multiprocess import MultiProcessCollector

    return MultiProcessCollector


class LiveCollector(_live_collector_base()):  # type: ignore[misc]
    """MultiProcessCollector that first forgets the live gauges of dead processes: a pool
    child killed mid-job (SIGKILL, OOM) must not stay 'in progress' forever."""

    def collect(self):
        from prometheus_client.multiprocess import mark_process_dead

        for path in glob.glob(os.path.join(self._path, "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            if not _alive(pid):
                mark_process_dead(pid, self._path)
        return super().collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_exporter: Exporter | None = None


def start_exporter(settings: Any) -> Exporter | None:
    """In the worker's main process, before the pool starts (celeryd_init)."""
    global _exporter
    if settings.worker_metrics_port is None or _exporter is not None:
        return _exporter
    _exporter = Exporter(settings.worker_metrics_port, settings.worker_metrics_host)
    return _exporter


def in_child() -> None:
    if _exporter is not None:
        _exporter.close_in_child()


def stop_exporter() -> None:
    global _exporter
    if _exporter is not None and os.getpid() == _exporter.pid:
        _exporter.close()
    _exporter = None
