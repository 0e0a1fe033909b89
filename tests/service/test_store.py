"""Persistence and worker plumbing without servers: migrations, references, keys, the
reconciler and the import discipline of the worker parent process."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from hcnr_core.errors import HCNRError
from store.references import resolve_reference
from tests.service.service_support import add_tenant_with_a_file, job_row


def test_sqlite_schema_matches_models_after_migrations(tmp_path: Path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from store.db import make_engine, migrate
    from store.models import Base

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    migrate(url)  # idempotent
    with make_engine(url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


@pytest.mark.parametrize(
    ("reference", "code"),
    [
        ("path:../outside", "invalid_reference"),
        ("path:/etc", "invalid_reference"),
        ("path:", "invalid_reference"),
        ("path:.", "invalid_reference"),  # the root itself is not a model
        ("path:a/../../outside", "invalid_reference"),
        ("path:link", "invalid_reference"),  # symlink leaving the root
        ("path:x\x00y", "invalid_reference"),
        ("path:missing", "reference_not_found"),
        ("hf:org/name", "reference_not_found"),  # main, never fetched into the cache
        ("hf:org/name@0123abc", "reference_not_found"),  # offline, not cached
        ("hf:org/../name", "invalid_reference"),
        ("s3://bucket/prefix", "reference_not_found"),  # only the validation fetches it
        ("/abs/dir", "invalid_reference"),
    ],
)
def test_references_are_confined_to_the_models_root(tmp_path: Path, reference: str, code: str):
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(HCNRError) as excinfo:
        resolve_reference(reference, root)
    assert excinfo.value.code == code


def test_reference_inside_root_resolves(tmp_path: Path):
    root = tmp_path / "models"
    (root / "org" / "model").mkdir(parents=True)
    (root / "alias").symlink_to(root / "org" / "model")  # links inside the root are fine
    assert resolve_reference("path:org/model", root) == (root / "org" / "model").resolve()
    assert resolve_reference("path:alias", root) == (root / "org" / "model").resolve()


def test_api_keys_are_stored_hashed(tmp_path: Path):
    from sqlalchemy import select

    from store import repositories
    from store.db import make_engine, make_session_factory, migrate, session_scope
    from store.models import ApiKey

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as session:
        key, plaintext = repositories.create_api_key(session, "acme")
    with session_scope(factory) as session:
        stored = session.scalars(select(ApiKey)).one()
        assert plaintext.split("_", 2)[2] not in (stored.secret_hash, stored.lookup)
        assert repositories.authenticate(session, plaintext).name == "acme"
        assert repositories.authenticate(session, plaintext + "x") is None
        assert repositories.revoke_api_key(session, key.id)
    with session_scope(factory) as session:
        assert repositories.authenticate(session, plaintext) is None


def test_reconciler_requeues_expired_leases_only(tmp_path: Path):
    from store.db import make_engine, make_session_factory, migrate, session_scope
    from store.models import Job, utcnow
    from store.settings import Settings
    from worker.reconciler import reconcile_once

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    factory = make_session_factory(make_engine(url))
    now = utcnow()
    with session_scope(factory) as session:
        add_tenant_with_a_file(session)
        for job_id, status, lease in [
            ("job_dead", "running", now - timedelta(seconds=5)),
            ("job_alive", "running", now + timedelta(seconds=60)),
            ("job_stopping", "cancelling", now - timedelta(seconds=5)),
            ("job_waiting", "queued", None),
            ("job_lost", "queued", None),
            ("job_validating", "validating", None),
            ("job_unvalidated", "validating", None),
        ]:
            session.add(
                job_row(
                    job_id,
                    status,
                    attempts=1,
                    worker_id="w:1",
                    lease_expires_at=lease,
                    queued_at=now - timedelta(seconds=3600 if job_id == "job_lost" else 1),
                    # a validation sent an hour ago and never done; one sent just now
                    created_at=now - timedelta(seconds=3600),
                    validation_sent_at=now
                    - timedelta(seconds=3600 if job_id == "job_unvalidated" else 1),
                )
            )
    sent, validations = [], []
    settings = Settings(database_url=url, requeue_queued_seconds=600)
    changed = reconcile_once(factory, settings, sent.append, validate=validations.append)
    assert changed == {"job_dead": "queued", "job_stopping": "cancelled", "job_lost": "queued"}
    assert sorted(sent) == ["job_dead", "job_lost"]
    assert validations == ["job_unvalidated"]  # its validation message was lost: re-sent
    with session_scope(factory) as session:
        assert session.get(Job, "job_alive").status == "running"
        assert session.get(Job, "job_waiting").status == "queued"
        assert session.get(Job, "job_unvalidated").status == "validating"  # only re-sent
    # re-sent once per interval
    assert reconcile_once(factory, settings, sent.append, validate=validations.append) == {}
    assert validations == ["job_unvalidated"]


def test_reconciler_resends_follow_up_messages_the_broker_never_accepted(tmp_path: Path):
    """A worker that dies between recording a job's outcome and sending its webhook / Hub
    push task (or a broker that is down then) leaves `notified_at` empty: the reconciler
    sends the follow-up again, once the job is older than the lost-message delay, and the
    producer records that the broker took it, so it is sent once; a send that fails is
    tried again at the next pass. Jobs already notified, or just finished, are left."""
    from celery import Celery

    from store import job_state
    from store.db import make_engine, make_session_factory, migrate, session_scope
    from store.models import Job, utcnow
    from store.settings import Settings
    from worker.celery_app import notify_with
    from worker.reconciler import reconcile_once

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    factory = make_session_factory(make_engine(url))
    now = utcnow()
    hour_ago = now - timedelta(seconds=3600)
    with session_scope(factory) as session:
        add_tenant_with_a_file(session)
        for job_id, status, finished, notified in [
            ("job_told", "succeeded", hour_ago, hour_ago),
            ("job_lost_ok", "succeeded", hour_ago, None),
            ("job_lost_failed", "failed", hour_ago, None),
            ("job_just_done", "cancelled", now, None),
            ("job_running", "running", None, None),
        ]:
            session.add(
                job_row(
                    job_id,
                    status,
                    webhook_url="https://example.com/hook",
                    lease_expires_at=now + timedelta(seconds=600),
                    finished_at=finished,
                    notified_at=notified,
                )
            )
    settings = Settings(database_url=url, requeue_queued_seconds=600)
    # Kombu's in-memory transport: a real producer, no server needed for sending
    producer = notify_with(Celery(broker="memory://"), factory)
    sent: list[str] = []
    broker_down = True

    def notify(job_id: str) -> None:
        sent.append(job_id)
        if broker_down:
            raise ConnectionError("broker unreachable")
        producer(job_id)

    reconcile_once(factory, settings, lambda _id: None, notify=notify)
    assert sorted(sent) == ["job_lost_failed", "job_lost_ok"]
    broker_down = False
    reconcile_once(factory, settings, lambda _id: None, notify=notify)  # tried again
    assert sorted(sent) == sorted(["job_lost_failed", "job_lost_ok"] * 2)
    with session_scope(factory) as session:
        for job_id in ("job_lost_ok", "job_lost_failed"):
            assert session.get(Job, job_id).notified_at is not None
        assert session.get(Job, "job_just_done").notified_at is None
        assert job_state.unnotified_jobs(session, utcnow()) == [session.get(Job, "job_just_done")]
    reconcile_once(factory, settings, lambda _id: None, notify=notify)
    assert len(sent) == 4  # accepted once: not sent again


def test_worker_parent_never_imports_torch():
    """CUDA must be initialised in the pool child: the parent does not even import torch."""
    code = "import sys, worker.tasks, worker.celery_app; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_keys_cli_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import json

    from typer.testing import CliRunner

    from hcnr_cli.main import app
    from store import repositories
    from store.db import make_engine, make_session_factory, session_scope

    monkeypatch.setenv("HCNR_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--name", "ci"])
    assert created.exit_code == 0, created.output
    plaintext = created.stdout.strip().splitlines()[0]
    assert plaintext.startswith("hcnr_")
    listed = json.loads(runner.invoke(app, ["keys", "list"]).stdout)
    assert [(k["tenant"], k["name"], k["revoked"]) for k in listed] == [("acme", "ci", False)]
    assert plaintext not in json.dumps(listed)
    factory = make_session_factory(make_engine(f"sqlite:///{tmp_path.resolve() / 'hcnr.db'}"))
    with session_scope(factory) as session:
        assert repositories.authenticate(session, plaintext).name == "acme"
    assert runner.invoke(app, ["keys", "revoke", listed[0]["id"]]).exit_code == 0
    assert runner.invoke(app, ["keys", "revoke", listed[0]["id"]]).exit_code == 1
    with session_scope(factory) as session:
        assert repositories.authenticate(session, plaintext) is None


def test_celery_configuration():
    from store.settings import Settings
    from worker.celery_app import TASK_NAME, make_celery

    redis_app = make_celery(Settings(broker_url="redis://127.0.0.1:1/0", visibility_timeout=99))
    conf = redis_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options == {"visibility_timeout": 99}
    embedded = make_celery(Settings())
    assert embedded.conf.broker_url.startswith("sqla+sqlite:///")
    assert embedded.conf.broker_transport_options == {}  # kombu SQLAlchemy takes none
    import worker.tasks

    task = worker.tasks.app.tasks[TASK_NAME]
    assert task.acks_late and task.reject_on_worker_lost
