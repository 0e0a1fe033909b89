"""`hcnr serve`: the API and one worker on this machine (embedded: SQLite, no broker server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Annotated

import typer

from hcnr_cli.common import require

WORKER_SHUTDOWN_SECONDS = 20
WORKER_SHUTDOWN_EXTRA_SECONDS = 3  # after the grace: the worker's kill and our own exit


def _celery_worker(pool: str, concurrency: int, queues: str, name: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", pool, "--concurrency", str(concurrency), "-Q", queues,
        "--loglevel", "INFO", "-n", name, "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def worker_command(concurrency: int = 1, name: str = "hcnr-embedded@%h") -> list[str]:
    """One prefork child per GPU: CUDA is initialised in the child, never in the parent.
    It consumes the jobs and the webhook deliveries (worker.celery_app.QUEUES)."""
    return _celery_worker("prefork", concurrency, "hcnr,hcnr.webhooks", name)


def validator_command(concurrency: int = 2, name: str = "hcnr-validator@%h") -> list[str]:
    """The CPU worker of the validation queue (worker/validation.py): threads, each check
    in a child process under the limits of hcnr_core.bounded. Never a GPU worker."""
    return _celery_worker("threads", concurrency, "hcnr.validation", name)


def validator_env(env: dict[str, str]) -> dict[str, str]:
    """Both workers of `hcnr serve` run on this machine: the validation worker's metrics
    endpoint takes HCNR_WORKER_METRICS_PORT + 1 (worker/metrics.py)."""
    port = env.get("HCNR_WORKER_METRICS_PORT", "").strip()
    if not port:
        return env
    return {**env, "HCNR_WORKER_METRICS_PORT": str(int(port) + 1)}


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if `hcnr serve` dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_worker(
    env: dict[str, str], command: list[str] | None = None, nice: int = 0
) -> subprocess.Popen:
    """`nice` > 0 lowers the worker's CPU priority (and its children's) below the API's."""
    command = command or worker_command()

    def setup() -> None:
        _die_with_parent()
        if nice:
            os.nice(nice)

    return subprocess.Popen(command, env=env, preexec_fn=setup)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # uvicorn restores this handler after its graceful shutdown and re-raises the signal:
    # turning it into SystemExit lets `serve` stop its worker on the way out.
    raise SystemExit(128 + signum)


def stop_worker(process: subprocess.Popen, grace: float = WORKER_SHUTDOWN_SECONDS) -> None:
    """SIGTERM (Celery's warm shutdown), SIGKILL after `grace` seconds: a job it was
    running is re-queued by its expired lease."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    worker: Annotated[bool, typer.Option(help="Also run a (GPU) worker process")] = True,
    validator: Annotated[
        bool, typer.Option(help="Also run the CPU worker that validates new jobs")
    ] = True,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            envvar="HCNR_API_WORKERS",
            help="API processes (uvicorn workers) sharing the port. One process runs Python "
            "on one core at a time: use about one per core the API may have. Each keeps "
            "its own database pool (HCNR_DB_POOL_SIZE + HCNR_DB_MAX_OVERFLOW connections)",
        ),
    ] = 1,
) -> None:
    """Run the repair-job API, the validation worker and a worker (settings from HCNR_*
    environment variables)."""
    require("service", "hcnr serve")
    require("compute", "hcnr serve")  # its workers repair
    import uvicorn

    from api.app import create_app
    from hcnr_core.bounded import stop_children
    from store.db import migrate as migrate_database
    from store.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    if workers == 1:
        app: object = create_app(settings)  # migrates the database first
    else:  # each process builds its app (api.app.create_served_app); migrate once, here
        if settings.auto_migrate:
            migrate_database(settings.db_url)
        app = "api.app:create_served_app"
    env = {**os.environ, "HCNR_DATA_DIR": str(settings.data_dir.resolve())}
    processes = []
    if validator:
        concurrency = settings.limits.max_concurrent_validations
        # Validations are CPU work (tokenising every sample) on the API's cores: a burst of
        # new jobs must not take them from the requests (bench/reliability.py `load`).
        command = validator_command(concurrency)
        processes.append(start_worker(validator_env(env), command, settings.validation_nice))
    if worker:
        processes.append(start_worker(env))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    typer.echo(
        f"HCNR API on http://{host}:{port} (data in {settings.data_dir.resolve()})", err=True
    )
    grace = settings.shutdown_grace_seconds
    try:
        # In-flight requests get `grace` seconds after SIGTERM, not forever (issue 14).
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            timeout_graceful_shutdown=max(1, round(grace)),
            timeout_keep_alive=round(settings.keep_alive_seconds),
            workers=workers,
            factory=workers > 1,
        )
        if workers == 1:
            _server(config, processes, stop_children).run()
        else:
            _supervisor(config, processes).run()
    finally:
        _exit_soon(WORKER_SHUTDOWN_EXTRA_SECONDS)
        for process in processes:  # they got SIGTERM with the server: the grace has passed
            stop_worker(process, 1.0)
        stop_children()  # validations still running in child processes


def _server(config: object, workers: list[subprocess.Popen], stop_children) -> object:
    """A uvicorn.Server that, on SIGTERM/SIGINT, also stops the workers and the validation
    children at once (not after the requests' grace)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)  # Celery's warm shutdown starts now
            stop_children()
            super().handle_exit(sig, frame)

    return Server(config)


def _supervisor(config: object, workers: list[subprocess.Popen]) -> object:
    """uvicorn's process supervisor (`--workers` > 1) that, like `_server`, stops the Celery
    workers as soon as it is asked to exit; each API process has its requests' grace."""
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def handle_term(self) -> None:
            _terminate(workers)
            super().handle_term()

        def handle_int(self) -> None:
            _terminate(workers)
            super().handle_int()

    return Supervisor(config, sockets=[config.bind_socket()])


def _terminate(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # Celery's warm shutdown starts now


def _exit_soon(seconds: float) -> None:
    """Leave within `seconds` even if a request thread (not a daemon) is still busy:
    Python would wait for it at exit."""
    timer = threading.Timer(seconds, lambda: os._exit(128 + signal.SIGTERM))
    timer.daemon = True
    timer.start()


def migrate() -> None:
    """Upgrade the database schema to the latest revision (HCNR_DATABASE_URL)."""
    from store.db import migrate as upgrade
    from store.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.db_url)
    typer.echo("database schema is up to date")


def register(app: typer.Typer) -> None:
    """`hcnr serve` and `hcnr migrate`."""
    app.command()(serve)
    app.command()(migrate)
