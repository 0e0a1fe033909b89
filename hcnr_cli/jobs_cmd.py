"""`hcnr jobs ...`: drive the repair-job API from pipelines (HCNR_API_URL, HCNR_API_KEY)."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from hcnr_cli.common import fail, parse_settings, require
from hcnr_core.config import DEFAULT_METHOD

app = typer.Typer(
    help="Repair jobs over HTTP (client of `hcnr serve` or a deployment).", no_args_is_help=True
)

ApiUrl = Annotated[str, typer.Option(envvar="HCNR_API_URL", help="Service base URL")]
ApiKey = Annotated[str, typer.Option(envvar="HCNR_API_KEY", help="Bearer API key")]
JobId = Annotated[str, typer.Argument(help="Repair job id (job_...)")]
DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_BY_STATUS = {"succeeded": 0, "failed": 1, "cancelled": 3}


def _client(url: str, key: str):
    require("client", "hcnr jobs")
    from hcnr_client import HCNRClient

    if not key:
        _fail("unauthorized", "no API key: pass --api-key or set HCNR_API_KEY")
    return HCNRClient(base_url=url, api_key=key)


def _fail(code: str, message: str, exit_code: int = 2) -> None:
    typer.echo(f"error [{code}]: {message}", err=True)
    raise typer.Exit(exit_code)


def _print(model: Any) -> None:
    typer.echo(
        model.model_dump_json(indent=2)
        if hasattr(model, "model_dump_json")
        else json.dumps(model, indent=2)
    )


def _call(function, *args: Any, **kwargs: Any) -> Any:
    from hcnr_client import APIConnectionError, HCNRError

    try:
        return function(*args, **kwargs)
    except APIConnectionError as exc:
        _fail(exc.code or "connection_error", f"{exc.message} ({exc.request.url})")
    except HCNRError as exc:
        code = getattr(exc, "code", None) or "client_error"
        message = getattr(exc, "message", None) or str(exc)
        details = getattr(exc, "details", None)
        details = f"\n{json.dumps(details, indent=2)}" if details else ""
        _fail(code, message + details)
    except OSError as exc:
        _fail("os_error", str(exc))


def _file_id(client, value: str, purpose: str) -> str:
    """An uploaded file id as is, or a local JSONL path that is uploaded first."""
    if value.startswith("file_") and not Path(value).exists():
        return value
    return _call(client.files.create, file=Path(value), purpose=purpose).id


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in items]
    if any(len(p) != 2 for p in pairs):
        _fail("invalid_argument", "metadata must be KEY=VALUE")
    return dict(pairs)


@app.command()
def create(
    base: Annotated[str, typer.Option(help="Base reference: path:<dir> or hf:org/name@rev")],
    finetuned: Annotated[str, typer.Option(help="Fine-tuned model or LoRA adapter reference")],
    honesty: Annotated[str, typer.Option(help="Honesty JSONL path or file id")],
    task: Annotated[str, typer.Option(help="Task JSONL path or file id")],
    eval_set: Annotated[str | None, typer.Option("--eval", help="Eval JSONL or file id")] = None,
    method: Annotated[
        str, typer.Option(help="auto (measured choice) | hcnr | rait | dpo")
    ] = DEFAULT_METHOD,
    validation: Annotated[
        str | None, typer.Option(help="auto: validation JSONL or file id (purpose eval)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON hyper-parameters")] = None,
    settings: Annotated[
        list[str], typer.Option("--set", help="KEY=VALUE hyper-parameter, repeatable")
    ] = [],  # noqa: B006
    metadata: Annotated[list[str], typer.Option(help="KEY=VALUE, repeatable")] = [],  # noqa: B006
    webhook_url: Annotated[str | None, typer.Option(help="Called on terminal states")] = None,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            metavar="ORG/NAME",
            help="Push the checkpoint to this Hub repository when the job succeeds, with "
            "the tenant's hf_token secret (hcnr_client: client.secrets.set)",
        ),
    ] = None,
    hub_private: Annotated[
        bool,
        typer.Option(
            "--hub-private/--hub-public", help="Visibility of a repository the push creates"
        ),
    ] = True,
    idempotency_key: Annotated[str | None, typer.Option(help="Safe retries of create")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to finish")] = False,
    api_url: ApiUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Upload the data (if paths are given) and create a repair job; prints the job."""
    import yaml

    try:
        overrides = parse_settings(settings)
    except ValueError as exc:
        fail(exc)
    client = _client(api_url, api_key)
    body: dict[str, Any] = {
        "method": method,
        "base": base,
        "finetuned": finetuned,
        "honesty_file": _file_id(client, honesty, "honesty"),
        "task_file": _file_id(client, task, "task"),
        "metadata": _pairs(metadata),
    }
    if eval_set:
        body["eval_file"] = _file_id(client, eval_set, "eval")
    if validation:
        body["validation_file"] = _file_id(client, validation, "eval")
    hyperparameters = (yaml.safe_load(config.read_text()) or {}) if config else {}
    if hyperparameters or overrides:
        body["hyperparameters"] = {**hyperparameters, **overrides}
    if webhook_url:
        body["webhook_url"] = webhook_url
    if push_to_hub:
        body["push_to_hub"] = {"repo_id": push_to_hub, "private": hub_private}
    job = _call(client.repair_jobs.create, **body, idempotency_key=idempotency_key)
    if wait:
        job = _call(client.repair_jobs.wait, job.id)
    _print(job)
    if wait:
        raise typer.Exit(EXIT_BY_STATUS.get(job.status, 1))


@app.command()
def get(job_id: JobId, api_url: ApiUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Status, stage, progress, ETA, timings, metrics and error of a job."""
    _print(_call(_client(api_url, api_key).repair_jobs.retrieve, job_id))


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this state")] = None,
    metadata: Annotated[list[str], typer.Option(help="KEY=VALUE filter")] = [],  # noqa: B006
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page")] = None,
    api_url: ApiUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Jobs, newest first: one page as the API returns it ({data, has_more, next_cursor})."""
    client = _client(api_url, api_key)
    page = _call(
        client.repair_jobs.list, after=cursor, limit=limit, status=status, metadata=_pairs(metadata)
    )
    _print(
        {
            "object": "list",
            "data": [job.model_dump(mode="json") for job in page.data],
            "has_more": page.has_more,
            "next_cursor": page.next_cursor,
        }
    )


@app.command()
def events(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until done")] = False,
    api_url: ApiUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Events of a job as JSON lines (`--follow` streams them live)."""
    jobs = _client(api_url, api_key).repair_jobs
    source = jobs.stream_events if follow else partial(jobs.list_events, limit=1000)
    _call(lambda: _echo_events(source(job_id)))


def _echo_events(events: Any) -> None:
    for event in events:
        typer.echo(event.model_dump_json())
        sys.stdout.flush()


@app.command()
def cancel(job_id: JobId, api_url: ApiUrl = DEFAULT_URL, api_key: ApiKey = "") -> None:
    """Cancel a job (queued: at once; running: between two steps)."""
    _print(_call(_client(api_url, api_key).repair_jobs.cancel, job_id))


@app.command("wait")
def wait_for(
    job_id: JobId,
    timeout: Annotated[float, typer.Option(help="Seconds before giving up")] = 3600,
    api_url: ApiUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Wait until the job finishes; exit 0 succeeded, 1 failed, 3 cancelled."""
    job = _call(_client(api_url, api_key).repair_jobs.wait, job_id, timeout=timeout)
    _print(job)
    raise typer.Exit(EXIT_BY_STATUS.get(job.status, 1))


@app.command()
def download(
    job_id: JobId,
    out: Annotated[Path, typer.Option(help="Directory for the repaired checkpoint")],
    api_url: ApiUrl = DEFAULT_URL,
    api_key: ApiKey = "",
) -> None:
    """Download the repaired checkpoint file by file (resumable: run it again after an
    interruption) and verify every sha256 against the artifact listing."""
    _call(_client(api_url, api_key).repair_jobs.download, job_id, out)
    typer.echo(json.dumps({"job": job_id, "out": str(out)}))


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="jobs")
