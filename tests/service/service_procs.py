"""Real servers for the service tests, started from Debian binaries in a temp dir:
redis-server, a PostgreSQL cluster (initdb + pg_ctl), a Celery worker, `hcnr serve`,
moto's S3 server. Each helper returns once the server answers."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from hcnr_cli.serve_cmd import worker_command

PYTHON = sys.executable
HCNR = str(Path(PYTHON).with_name("hcnr"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT_ATTEMPTS = 5
BIND_ERRORS = ("address already in use", "could not bind", "error while attempting to bind")


class PortTaken(Exception):
    """The server could not bind the port free_port() gave: another process took it."""


def on_free_port(start: Callable[[int], Any], what: str) -> Any:
    """free_port() is check-then-use: on a shared machine another process may bind the
    port before our server does. `start(port)` raises PortTaken when its server could
    not bind (or answered as some other process); then it runs again on a new port."""
    for _ in range(PORT_ATTEMPTS):
        try:
            return start(free_port())
        except PortTaken:
            continue
    raise RuntimeError(f"{what}: every one of {PORT_ATTEMPTS} free ports was taken first")


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on `port` (Linux /proc): a server
    that answers on the port may be another one that took it first."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False


def _bind_failed(process: subprocess.Popen, log: Path, timeout: float = 10) -> bool:
    """True when the process exited (within `timeout`) saying it could not bind."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    text = log.read_text(errors="replace").lower() if log.exists() else ""
    return any(error in text for error in BIND_ERRORS)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process and its children (a worker dying abruptly)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# --- redis ---------------------------------------------------------------------------


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    return on_free_port(lambda port: _start_redis(workdir, port), "redis-server")


def _start_redis(workdir: Path, port: int) -> tuple[subprocess.Popen, str]:
    log = workdir / "redis.log"
    process = subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--appendonly",
            "yes",
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def ours() -> bool:  # answering, and as this process (not whoever took the port)
        import redis

        if process.poll() is not None:
            raise RuntimeError("redis-server exited")
        return redis.Redis.from_url(url).info("server")["process_id"] == process.pid

    try:
        wait_until(_raising(ours), 20, "redis-server")
    except _Fatal:
        if _bind_failed(process, log):
            raise PortTaken(port) from None
        raise RuntimeError(f"redis-server exited; see {log}") from None
    except BaseException:
        stop(process)
        raise
    return process, url


# --- postgres ------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


class Postgres:
    def __init__(self, workdir: Path):
        self.bindir = postgres_bindir()
        self.workdir = workdir
        self.data = workdir / "pgdata"
        self.port = 0  # chosen by start()
        self.prefix = _as_postgres_user()

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, cwd="/")

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.prefix:
            self.workdir.chmod(0o777)
            shutil.chown(self.workdir, "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.port = on_free_port(self._start_on, "postgres")
        self._run(
            str(self.bindir / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "hcnr",
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/hcnr"

    def _start_on(self, port: int) -> int:
        log = self.workdir / "postgres.log"
        options = f"-p {port} -k {self.workdir} -h 127.0.0.1 -F"
        try:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "start",
            )
        except subprocess.CalledProcessError:
            text = log.read_text(errors="replace").lower() if log.exists() else ""
            if any(error in text for error in BIND_ERRORS):
                log.unlink()  # the next attempt's log is read afresh
                raise PortTaken(port) from None
            raise
        return port

    def stop(self) -> None:
        subprocess.run(
            [
                *self.prefix,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            cwd="/",
        )


# --- hcnr processes --------------------------------------------------------------------


# worker/faults.py (HCNR_ENV=test only): a job labelled slow=yes sleeps 0.2 s per progress
# event, so a "mid-run" cancel or kill finds it running on any machine, however fast.
SLOW_LABEL = {"slow": "yes"}
SLOW_FAULT = "slow_on_label=slow:yes:0.2"


def service_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HCNR_")}
    env.update({f"HCNR_{k.upper()}": str(v) for k, v in settings.items()})
    if settings.get("env") == "test":
        env.setdefault("HCNR_FAULT_INJECTION", SLOW_FAULT)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # The HCNR_ variables of this process are dropped above, tests/conftest.py's
    # HCNR_HUB_OFFLINE=1 with them: a served validation of an hf: reference then asked the
    # hub (a DNS lookup of huggingface.co, caught by the strace fuzz when it fell inside its
    # window). Tests never reach a hub unless one asks, with hub_offline=...
    env.setdefault("HCNR_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def create_key(env: dict[str, str], tenant: str) -> str:
    result = subprocess.run(
        [HCNR, "keys", "create", "--tenant", tenant],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def start_api(
    env: dict[str, str], log: Path, worker: bool = True, validator: bool = True
) -> tuple[subprocess.Popen, str]:
    """`hcnr serve` (API, plus the embedded worker unless worker=False, and the
    validation worker unless validator=False)."""
    return on_free_port(lambda port: _start_api(env, log, worker, validator, port), "hcnr serve")


def _start_api(
    env: dict[str, str], log: Path, worker: bool, validator: bool, port: int
) -> tuple[subprocess.Popen, str]:
    command = [HCNR, "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += [] if worker else ["--no-worker"]
    command += [] if validator else ["--no-validator"]
    process = subprocess.Popen(
        command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"hcnr serve exited; see {log}")
        ok = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        return ok and listens_on(process.pid, port)  # answered by this server

    try:
        wait_until(_raising(ready), 90, "hcnr serve")
    except _Fatal:
        if _bind_failed(process, log):
            stop(process)
            raise PortTaken(port) from None
        stop(process)
        raise
    except BaseException:
        stop(process)
        raise
    return process, url


def start_celery_worker(
    env: dict[str, str], log: Path, name: str, command: list[str] | None = None
) -> subprocess.Popen:
    """A real `celery worker` (prefork, one child) in its own process group; `command`:
    another one of `hcnr serve`'s (the validation worker's, validator_command)."""
    command = command or worker_command(name=f"{name}@%h")  # exactly what `hcnr serve` runs
    process = subprocess.Popen(
        command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"celery worker exited; see {log}")
        return "ready." in log.read_text(errors="replace")

    _start_or_stop(process, lambda: wait_until(_raising(ready), 90, "celery worker"))
    return process


def start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    return on_free_port(lambda port: _start_moto(workdir, port), "moto server")


def _start_moto(workdir: Path, port: int) -> tuple[subprocess.Popen, str]:
    log = workdir / "moto.log"
    process = subprocess.Popen(
        [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited; see {log}")
        return httpx.get(url, timeout=2).status_code < 500 and listens_on(process.pid, port)

    try:
        wait_until(_raising(ready), 60, "moto server")
    except _Fatal:
        if _bind_failed(process, log):
            raise PortTaken(port) from None
        raise RuntimeError(f"moto server exited; see {log}") from None
    except BaseException:
        stop(process)
        raise
    return process, url


def _start_or_stop(process: subprocess.Popen, wait: Callable[[], None]) -> None:
    """Never leak a server whose start failed."""
    try:
        wait()
    except BaseException:
        stop(process)
        raise


def _raising(check: Callable[[], bool]) -> Callable[[], bool]:
    """wait_until swallows exceptions; a process that died must fail at once."""

    def wrapped() -> bool:
        try:
            return check()
        except RuntimeError as exc:
            raise _Fatal(str(exc)) from exc

    return wrapped


class _Fatal(BaseException):
    pass
