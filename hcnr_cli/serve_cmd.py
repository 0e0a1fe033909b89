"""`hcnr serve`: the API and one worker on this machine (embedded: SQLite, no broker server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

WORKER_SHUTDOWN_SECONDS = 20


def worker_command(concurrency: int = 1, name: str = "hcnr-embedded@%h") -> list[str]:
    """One prefork child per GPU: CUDA is initialised in the child, never in the parent."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "-Q",
        "hcnr",
        "--loglevel",
        "INFO",
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
    ]


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if `hcnr serve` dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_worker(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(worker_command(), env=env, preexec_fn=_die_with_parent)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # uvicorn restores this handler after its graceful shutdown and re-raises the signal:
    # turning it into SystemExit lets `serve` stop its worker on the way out.
    raise SystemExit(128 + signum)


def stop_worker(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_SHUTDOWN_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    worker: Annotated[bool, typer.Option(help="Also run a worker process")] = True,
) -> None:
    """Run the repair-job API and a worker (settings from HCNR_* environment variables)."""
    import uvicorn

    from api.app import create_app
    from store.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    app = create_app(settings)  # migrates the database first
    env = {**os.environ, "HCNR_DATA_DIR": str(settings.data_dir.resolve())}
    process = start_worker(env) if worker else None
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    typer.echo(
        f"HCNR API on http://{host}:{port} (data in {settings.data_dir.resolve()})", err=True
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        if process is not None:
            stop_worker(process)


def migrate() -> None:
    """Upgrade the database schema to the latest revision (HCNR_DATABASE_URL)."""
    from store.db import migrate as upgrade
    from store.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    upgrade(settings.db_url)
    typer.echo("database schema is up to date")
