"""Figure 7: uploads. Exactly the limit is accepted, one byte over is 413 with nothing
stored; ≥ 100 generated malformed JSONL files are 422 `invalid_data` naming the bad line;
a real server's memory stays flat while a 64 MiB upload streams to disk and while a
512 MiB one is cut off at the limit."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.security.hostile import (
    AppEnv,
    RssSampler,
    World,
    error_code,
    exact_size_jsonl,
    jsonl_chunks,
    jsonl_variants,
    make_app_env,
    multipart_stream,
    zero_chunks,
)
from tests.service import service_procs as procs

pytestmark = [pytest.mark.security, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
LIMIT = 16 * 1024
LINE_LIMIT = 4096
MiB = 1024 * 1024


def stored_files(env: AppEnv) -> list[Path]:
    """Everything an upload may leave behind: stored files and scratch leftovers."""
    data = env.data_dir
    return sorted(p for p in data.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".part"))


def file_rows(env: AppEnv) -> int:
    from sqlalchemy import func, select

    from store.models import File

    with env.inproc.app.state.session_factory() as session:
        return session.scalar(select(func.count()).select_from(File))


@pytest.fixture(scope="module")
def small(world: World, tmp_path_factory: pytest.TempPathFactory) -> AppEnv:
    return make_app_env(
        world,
        tmp_path_factory.mktemp("small"),
        max_upload_bytes=LIMIT,
        max_line_bytes=LINE_LIMIT,
    )


def upload(env: AppEnv, data: bytes, purpose: str = "task", name: str = "x.jsonl"):
    files = {"file": (name, data, "application/jsonl")}
    return env.alice.post("/v1/files", files=files, data={"purpose": purpose})


def test_exactly_the_limit_is_accepted(small: AppEnv):
    response = upload(small, exact_size_jsonl(LIMIT))
    assert response.status_code == 201, response.text
    assert response.json()["bytes"] == LIMIT and response.json()["samples"] == 10


def test_one_byte_over_is_413_and_nothing_is_stored(small: AppEnv):
    before, rows = stored_files(small), file_rows(small)
    response = upload(small, exact_size_jsonl(LIMIT + 1))
    assert response.status_code == 413 and error_code(response) == "payload_too_large"
    assert stored_files(small) == before and file_rows(small) == rows
    assert not list((small.data_dir / "scratch").iterdir())


def test_far_over_the_limit_is_413_before_the_body_is_read(small: AppEnv):
    before = stored_files(small)
    response = upload(small, b"x" * (LIMIT + 200_000))  # Content-Length says it all
    assert response.status_code == 413 and error_code(response) == "payload_too_large"
    assert stored_files(small) == before


def malformed_results(env: AppEnv) -> list[dict]:
    results = []
    for name, data, line in jsonl_variants(LINE_LIMIT):
        response = upload(env, data, "honesty")
        details = (response.json().get("error") or {}).get("details") or {}
        results.append(
            {
                "name": name,
                "status": response.status_code,
                "code": error_code(response),
                "expected_line": line,
                "lines": [p["line"] for p in details.get("problems", [])],
            }
        )
    return results


def test_malformed_jsonl_is_refused_with_the_line_number(small: AppEnv):
    before, rows = stored_files(small), file_rows(small)
    results = malformed_results(small)
    assert len(results) >= 100
    wrong = [
        r
        for r in results
        if r["status"] != 422 or r["code"] != "invalid_data" or r["expected_line"] not in r["lines"]
    ]
    assert not wrong
    assert stored_files(small) == before and file_rows(small) == rows


def test_line_limit_boundary(small: AppEnv):
    """A line of exactly the per-line limit is fine; one byte more is refused."""
    import json

    skeleton = len(json.dumps({"prompt": "q", "response": ""}).encode())
    rows = [{"prompt": "q", "response": "r"}] * 7
    for extra, status in ((0, 201), (1, 422)):
        longest = {"prompt": "q", "response": "y" * (LINE_LIMIT - skeleton + extra)}
        data = "\n".join(json.dumps(r) for r in [*rows, longest]).encode() + b"\n"
        assert len(json.dumps(longest).encode()) == LINE_LIMIT + extra
        assert upload(small, data).status_code == status


def test_worker_parser_accepts_what_the_api_accepts(small: AppEnv, world: World):
    """The API's streaming validator and hcnr_core's parser agree on a valid file."""
    from api.services import validate_jsonl_stream
    from hcnr_core.data import load_jsonl

    with world.honesty.open("rb") as handle:
        count = validate_jsonl_stream(
            handle, "h", min_samples=1, max_samples=10**6, max_line_bytes=LINE_LIMIT
        )
    assert count == len(load_jsonl(world.honesty))


# --- memory of a real server while large bodies stream in ------------------------------------


def stream_upload(url: str, key: str, body, timeout: float = 300) -> tuple[int | None, str]:
    """POST `body` chunked over a raw socket while a second thread reads the answer.

    A server that answers 413 and closes while we are still sending is seen answering 413:
    the answer is read as it arrives, not after the send (httpx would report only the
    broken pipe, which a crashed or hung server gives too). Returns (None, why) when no
    HTTP answer came at all."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    answer = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):
            while chunk := sock.recv(1 << 16):
                answer.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=hcnr-security-boundary\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    send_error = ""
    try:
        sock.sendall(head)
        for piece in body:
            if piece:
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
    except OSError as exc:  # the server closed while we still sent: its answer may be read
        send_error = type(exc).__name__
    reader.join(timeout)
    sock.close()
    status_line, _, rest = bytes(answer).partition(b"\r\n")
    fields = status_line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return None, f"no HTTP answer ({send_error or 'timeout or closed'})"
    return int(fields[1]), rest.partition(b"\r\n\r\n")[2].decode(errors="replace")


def measure_upload_memory(world: World, workdir: Path, accepted_mib: int = 64, cut_mib: int = 512):
    """`hcnr serve --no-worker` (uvicorn) as a subprocess; peak RSS growth (VmHWM after a
    reset) while (1) exactly the 64 MiB default limit of valid JSONL streams in and is
    stored, (2) a 512 MiB body streams at it and is refused."""
    data_dir = workdir / "data"
    env = procs.service_env(env="test", data_dir=data_dir, models_root=world.models)
    key = procs.create_key(env, "alice")
    server, url = procs.start_api(env, workdir / "api.log", worker=False)
    try:
        pid = server.pid
        # Warm up the code paths (imports, first request) before measuring.
        stream_upload(url, key, multipart_stream(jsonl_chunks(1 * MiB), "task"))
        accepted_bytes = accepted_mib * MiB
        started = time.monotonic()
        with RssSampler(pid) as accepted:
            status, text = stream_upload(
                url, key, multipart_stream(jsonl_chunks(accepted_bytes), "task")
            )
        accepted_seconds = time.monotonic() - started
        stored = [p for p in (data_dir / "artifacts").rglob("*.jsonl")]
        with RssSampler(pid) as cut:
            cut_status, cut_text = stream_upload(
                url, key, multipart_stream(zero_chunks(cut_mib * MiB), "task")
            )
        stored_after = [p for p in (data_dir / "artifacts").rglob("*.jsonl")]
    finally:
        procs.stop(server)
    return {
        "accepted_status": status,
        "accepted_body": text[:300],
        "accepted_mib": accepted_mib,
        "accepted_growth_mib": accepted.growth_mib,
        "accepted_seconds": accepted_seconds,
        "accepted_stored_mib": max((p.stat().st_size for p in stored), default=0) / MiB,
        "cut_mib": cut_mib,
        "cut_status": cut_status,
        "cut_body": cut_text[:300],
        "cut_growth_mib": cut.growth_mib,
        "cut_stored_new": len(stored_after) - len(stored),
        "hwm_reset": accepted.hwm_reset,
    }


@pytest.fixture(scope="module")
def memory(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return measure_upload_memory(world, tmp_path_factory.mktemp("upload-memory"))


def test_accepted_large_upload_keeps_memory_flat(memory):
    assert memory["accepted_status"] == 201, memory["accepted_body"]
    assert memory["accepted_stored_mib"] == 64
    assert memory["accepted_growth_mib"] < 16, memory  # far below the 64 MiB it stored


def test_oversized_stream_is_cut_off_with_flat_memory(memory):
    # The 413 itself, read while we were still sending: a closed connection or a timeout
    # (a crashed or hung server) is not a cut-off.
    assert memory["cut_status"] == 413, memory["cut_body"]
    assert '"payload_too_large"' in memory["cut_body"], memory["cut_body"]
    assert memory["cut_stored_new"] == 0
    assert memory["cut_growth_mib"] < 16, memory  # of the 512 MiB sent at it
