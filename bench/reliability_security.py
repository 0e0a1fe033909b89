"""Security figures 5-9 (issue #5), measured with the same cases and instruments as
tests/security/. `SECTIONS[name](workdir)` runs one measurement and returns
{"title", "rows": [(figure, value), ...], "command"}; bench/reliability.py collects them
into bench/results/reliability.md.

Standalone: `.venv/bin/python -m bench.reliability_security [section ...]` prints markdown.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python -m bench.reliability_security {name}"
TESTS = ".venv/bin/python -m pytest tests/security/{file}"
_WORLDS: dict[Path, Any] = {}


def _world(workdir: Path):
    """One models root with the hostile checkpoints per workdir (built once)."""
    from tests.security import hostile

    workdir = workdir.resolve()
    if workdir not in _WORLDS:
        _WORLDS[workdir] = hostile.build_world(Path(tempfile.mkdtemp(dir=workdir, prefix="world-")))
    return _WORLDS[workdir]


def _env(workdir: Path, name: str, **settings: Any):
    from tests.security import hostile

    return hostile.make_app_env(
        _world(workdir), Path(tempfile.mkdtemp(dir=workdir, prefix=name)), **settings
    )


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _postgres(workdir: Path):
    from tests.service import service_procs as procs

    if procs.postgres_bindir() is None:
        return None, None
    pg_dir = Path(tempfile.mkdtemp(prefix="hcnr-bench-pg-"))
    server = procs.Postgres(pg_dir)
    return server, server.start()


def _stop_postgres(server) -> None:
    if server is not None:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


# --- 5 --------------------------------------------------------------------------------------


def malicious_checkpoints(workdir: Path) -> dict:
    from test_security_checkpoints import checkpoint_results

    env = _env(workdir, "ckpt-")
    results = checkpoint_results(env)
    hostile_ = [r for r in results if r["expected"]]
    right = [r for r in hostile_ if r["status"] == 422 and r["code"] == r["expected"]]
    codes = sorted({r["code"] for r in right})
    accepted = [r for r in results if r["expected"] is None]
    return {
        "title": "5. Malicious checkpoints referenced by a job (through the HTTP API)",
        "rows": [
            ("hostile checkpoint kinds", len({r["case"] for r in hostile_})),
            ("requests (kind x role base/fine-tuned)", len(hostile_)),
            ("refused with the expected stable code (422)", _pct(len(right), len(hostile_))),
            ("codes", ", ".join(codes)),
            (
                "jobs queued or created for a refused checkpoint",
                sum(1 for r in hostile_ if r["queued"] or r["jobs_added"]),
            ),
            (
                "pickle/remote-code sentinel created",
                "yes"
                if any(r["sentinel"] for r in results) or _world(workdir).sentinel.exists()
                else "no",
            ),
            (
                "reads outside the models root (audit hook)",
                sum(len(r["outside_reads"]) for r in results),
            ),
            (
                "harmless oddities accepted (pickle beside safetensors, hard link, ...)",
                f"{sum(r['status'] == 201 for r in accepted)}/{len(accepted)}",
            ),
        ],
        "command": COMMAND.format(name="checkpoints")
        + "; "
        + TESTS.format(file="test_security_checkpoints.py"),
    }


# --- 6 --------------------------------------------------------------------------------------


def reference_fuzz(workdir: Path) -> dict:
    from test_security_references import ALLOWED_CODES, fuzz_results, strace_fuzz

    from tests.security import hostile

    env = _env(workdir, "refs-")
    results = fuzz_results(env)
    four = [r for r in results if 400 <= r["status"] < 500 and r["code"] in ALLOWED_CODES]
    rows = [
        ("distinct reference strings", len({r["ref"] for r in results})),
        ("requests (x role base/fine-tuned)", len(results)),
        ("4xx with a JSON error code", _pct(len(four), len(results))),
        ("5xx", sum(1 for r in results if r["status"] >= 500)),
        ("jobs created", len(env.job_ids())),
        (
            "reads outside the roots, audit hook (Python opens/listings)",
            sum(len(r["outside"]) for r in results),
        ),
    ]
    reason = hostile.strace_available()
    if reason:
        rows.append(("reads outside the roots, strace of hcnr serve", f"not measured: {reason}"))
    else:
        traced = strace_fuzz(_world(workdir), Path(tempfile.mkdtemp(dir=workdir, prefix="strace-")))
        rows += [
            (
                "strace: requests / file+exec+connect syscalls in the window",
                f"{traced['requests']} / {traced['syscalls']}",
            ),
            ("strace: opens/execs outside the roots", len(traced["opens_outside"])),
            ("strace: stat/readlink probes outside the roots", len(traced["probes_outside"])),
            ("strace: network connects", len(traced["connects"])),
            (
                "strace positive control: model-root opens for one valid job",
                traced["control_reads_models"],
            ),
        ]
    return {
        "title": "6. Reference fuzz (base and fine-tuned references)",
        "rows": rows,
        "command": COMMAND.format(name="references")
        + "; "
        + TESTS.format(file="test_security_references.py"),
    }


# --- 7 --------------------------------------------------------------------------------------


def uploads(workdir: Path) -> dict:
    from test_security_uploads import (
        LIMIT,
        LINE_LIMIT,
        malformed_results,
        measure_upload_memory,
        stored_files,
        upload,
    )

    from tests.security.hostile import exact_size_jsonl

    env = _env(workdir, "uploads-", max_upload_bytes=LIMIT, max_line_bytes=LINE_LIMIT)
    exact = upload(env, exact_size_jsonl(LIMIT)).status_code
    before = stored_files(env)
    over = upload(env, exact_size_jsonl(LIMIT + 1)).status_code
    stored_over = len(stored_files(env)) - len(before)
    results = malformed_results(env)
    right = [r for r in results if r["status"] == 422 and r["expected_line"] in r["lines"]]
    memory = measure_upload_memory(
        _world(workdir), Path(tempfile.mkdtemp(dir=workdir, prefix="mem-"))
    )
    return {
        "title": "7. Uploads: size limit, malformed JSONL, server memory",
        "rows": [
            (f"exactly the limit ({LIMIT} B) / one byte over", f"{exact} / {over}"),
            ("files stored by the over-limit upload", stored_over),
            ("malformed JSONL variants", len(results)),
            ("refused 422 invalid_data naming the right line", _pct(len(right), len(results))),
            (
                f"RSS growth of uvicorn while {memory['accepted_mib']} MiB streams in and is "
                f"stored (status {memory['accepted_status']}, "
                f"{memory['accepted_seconds']:.1f}s)",
                f"{memory['accepted_growth_mib']:.1f} MiB",
            ),
            (
                f"RSS growth while {memory['cut_mib']} MiB streams at the 64 MiB limit "
                f"(status {memory['cut_status']})",
                f"{memory['cut_growth_mib']:.1f} MiB",
            ),
            ("files stored by the cut-off stream", memory["cut_stored_new"]),
            (
                "peak measured by",
                "VmHWM after a clear_refs reset" if memory["hwm_reset"] else "sampled VmRSS",
            ),
        ],
        "command": COMMAND.format(name="uploads")
        + "; "
        + TESTS.format(file="test_security_uploads.py"),
    }


# --- 8 --------------------------------------------------------------------------------------


def tenant_isolation(workdir: Path) -> dict:
    from test_security_tenancy import alice_state, dump_check, isolation_results

    rows = []
    env = _env(workdir, "tenancy-")
    result = isolation_results(env, alice_state(env))
    rows += [
        (
            "SQLite: attempts by tenant B on tenant A's ids (operations with an id)",
            f"{result['attempts']} ({result['operations']})",
        ),
        ("SQLite: tenant B successes", len(result["successes"])),
        ("SQLite: answers leaking A's ids or digests", len(result["leaks"])),
        ("SQLite: answers", ", ".join(f"{s} {c}" for s, c in sorted(result["shapes"]))),
    ]
    server, url = _postgres(workdir)
    try:
        if url is None:
            rows.append(("PostgreSQL", "not measured: PostgreSQL binaries missing"))
        else:
            pg = _env(workdir, "tenancy-pg-", database_url=url)
            result = isolation_results(pg, alice_state(pg))
            rows += [
                (
                    "PostgreSQL: attempts / tenant B successes",
                    f"{result['attempts']} / {len(result['successes'])}",
                ),
                ("PostgreSQL: answers", ", ".join(f"{s} {c}" for s, c in sorted(result["shapes"]))),
            ]
            exposure = dump_check(url, pg, Path(tempfile.mkdtemp(dir=workdir, prefix="dump-")))
            rows += [
                ("pg_dump: API keys created (library, CLI, app)", exposure["keys"]),
                (
                    "pg_dump: plaintext keys / secret parts",
                    f"{exposure['plaintext_keys']} / {exposure['plaintext_secrets']}",
                ),
                (
                    "pg_dump: 8-character secret fragments / prefix beyond hcnr_<lookup>_",
                    f"{exposure['secret_fragments']} / {exposure['prefix_beyond_lookup']}",
                ),
            ]
    finally:
        _stop_postgres(server)
    return {
        "title": "8. Tenant isolation and key storage",
        "rows": rows,
        "command": COMMAND.format(name="tenancy")
        + "; "
        + TESTS.format(file="test_security_tenancy.py"),
    }


# --- 9 --------------------------------------------------------------------------------------


def schemathesis_run(workdir: Path) -> dict:
    from test_security_schemathesis import MAX_EXAMPLES, SEED, UNSUITABLE_CHECKS, run_schemathesis

    rows = []
    server, url = _postgres(workdir)
    try:
        backends = [("SQLite", {})] + ([("PostgreSQL", {"database_url": url})] if url else [])
        for label, settings in backends:
            env = _env(workdir, f"st-{label}-", **settings)
            key = env.alice.headers["Authorization"].removeprefix("Bearer ")
            r = run_schemathesis(env.inproc.app, key)
            statuses = ", ".join(
                f"{k.removeprefix('status_')}: {v}" for k, v in sorted(r["statuses"].items())
            )
            rows += [
                (
                    f"{label}: operations / examples (positive + negative)",
                    f"{r['operations']} / {r['examples']}",
                ),
                (
                    f"{label}: 5xx / response schema violations / other check failures",
                    f"{r['5xx']} / {len(r['schema_violations'])} / "
                    f"{len(r['failures']) - len(r['schema_violations'])}",
                ),
                (f"{label}: responses by class ({r['seconds']}s)", statuses),
            ]
    finally:
        _stop_postgres(server)
    rows.append(("seed / max examples per operation and mode", f"{SEED} / {MAX_EXAMPLES}"))
    rows.append(("checks not run", ", ".join(sorted(UNSUITABLE_CHECKS)) + " (see the test)"))
    return {
        "title": "9. Schemathesis against /openapi.json (authenticated)",
        "rows": rows,
        "command": COMMAND.format(name="schemathesis")
        + "; "
        + TESTS.format(file="test_security_schemathesis.py"),
    }


SECTIONS: dict[str, Callable[[Path], dict]] = {
    "checkpoints": malicious_checkpoints,
    "references": reference_fuzz,
    "uploads": uploads,
    "tenancy": tenant_isolation,
    "schemathesis": schemathesis_run,
}


def markdown(section: dict) -> str:
    lines = [f"### {section['title']}", "", "| figure | value |", "|---|---|"]
    lines += [f"| {figure} | {value} |" for figure, value in section["rows"]]
    return "\n".join([*lines, "", f"`{section['command']}`", ""])


def main(names: list[str]) -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("hcnr.api").setLevel(logging.CRITICAL)
    workdir = Path(tempfile.mkdtemp(prefix="hcnr-security-bench-"))
    try:
        for name in names or list(SECTIONS):
            print(markdown(SECTIONS[name](workdir)), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
