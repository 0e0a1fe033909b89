"""Engine and session factory; SQLite gets WAL, foreign keys and a busy timeout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def pool_options(url: str, size: int, overflow: int) -> dict[str, Any]:
    """QueuePool sizes (PostgreSQL; SQLite's pool is left as it is). A request thread that
    finds the pool empty opens an overflow connection and closes it on return: with a pool
    smaller than the request threads, the API under load spent its time connecting."""
    if url.startswith("sqlite"):
        return {}
    return {"pool_size": size, "max_overflow": overflow}


def worker_engine_options(url: str, lease_seconds: int) -> dict[str, Any]:
    """Engine options of worker processes. PostgreSQL ends a worker's transaction that
    sits idle longer than a lease: a worker frozen mid-transaction (SIGSTOP, a paused VM)
    would otherwise keep its job row locked, and the reconciler, which skips locked rows,
    would never re-queue the job."""
    if not url.startswith("postgresql"):
        return {}
    timeout_ms = int(lease_seconds * 1000)
    return {"connect_args": {"options": f"-c idle_in_transaction_session_timeout={timeout_ms}"}}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Bring the database schema to the latest Alembic revision."""
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")
