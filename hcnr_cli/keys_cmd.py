"""`hcnr keys`: create, list and revoke API keys (admin, direct database access)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from hcnr_cli.common import require

app = typer.Typer(
    help="Manage API keys (stored hashed; a key is shown once).", no_args_is_help=True
)


@app.callback()
def _needs_the_service() -> None:
    require("service", "hcnr keys")


def _session_factory():
    from store.db import make_engine, make_session_factory, migrate
    from store.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    migrate(settings.db_url)
    return make_session_factory(make_engine(settings.db_url))


@app.command("create")
def create(
    tenant: Annotated[str, typer.Option(help="Tenant name (created if new)")],
    name: Annotated[str, typer.Option(help="A label for the key")] = "",
) -> None:
    """Create a key for TENANT and print it once."""
    from store import repositories
    from store.db import session_scope

    with session_scope(_session_factory()) as session:
        key, plaintext = repositories.create_api_key(session, tenant, name)
        key_id = key.id
    typer.echo(plaintext)
    typer.echo(f"key id {key_id} for tenant {tenant!r}; this key is not shown again", err=True)


@app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="Key id (key_...) or lookup")]) -> None:
    """Revoke a key: it stops working at once."""
    from store import repositories
    from store.db import session_scope

    with session_scope(_session_factory()) as session:
        revoked = repositories.revoke_api_key(session, key_id)
    if not revoked:
        typer.echo(f"no active key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command("list")
def list_keys() -> None:
    """Key ids, tenants and state (never the keys)."""
    from store import repositories
    from store.db import session_scope

    with session_scope(_session_factory()) as session:
        rows = [
            {
                "id": k.id,
                "tenant": k.tenant.name,
                "name": k.name,
                "created_at": k.created_at.isoformat(),
                "revoked": k.revoked_at is not None,
            }
            for k in repositories.list_api_keys(session)
        ]
    typer.echo(json.dumps(rows, indent=2))


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="keys")
