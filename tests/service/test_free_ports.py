"""The test servers' free ports: free_port() is check-then-use, so on a shared machine
another process can take the port before our server binds it. The starters must then
start again on another port, and never take someone else's server for theirs."""

from __future__ import annotations

import http.server
import os
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service import service_procs as procs
from tests.service.service_support import Models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def squatter() -> Iterator[int]:
    """An HTTP server on a port that answers 200 to everything (/readyz included)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def first_port_taken(monkeypatch: pytest.MonkeyPatch, taken: int) -> list[int]:
    """free_port() returns `taken` first (as if another process grabbed it right after
    the check), then really free ports; returns the ports handed out."""
    real, handed = procs.free_port, []

    def port() -> int:
        handed.append(taken if not handed else real())
        return handed[-1]

    monkeypatch.setattr(procs, "free_port", port)
    return handed


def test_api_starts_on_another_port_when_its_port_was_taken(
    squatter: int, monkeypatch, models: Models, tmp_path
):
    handed = first_port_taken(monkeypatch, squatter)
    env = procs.service_env(env="test", data_dir=tmp_path / "data", models_root=models.root)
    process, url = procs.start_api(env, tmp_path / "api.log", worker=False)
    try:
        port = urlsplit(url).port
        assert handed[0] == squatter and port == handed[-1] != squatter
        assert procs.listens_on(process.pid, port) and process.poll() is None
        assert httpx.get(f"{url}/readyz", timeout=5).json() != {}  # ours, not the squatter
    finally:
        procs.stop(process)


def test_redis_starts_on_another_port_when_its_port_was_taken(monkeypatch, tmp_path):
    if procs.redis_binary() is None:
        pytest.skip("redis-server is not installed (run scripts/install-services.sh)")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        handed = first_port_taken(monkeypatch, taken)
        process, url = procs.start_redis(tmp_path / "redis")
        try:
            assert handed[0] == taken and urlsplit(url).port == handed[-1] != taken
            assert procs.listens_on(process.pid, urlsplit(url).port)
        finally:
            procs.stop(process)


def test_listens_on_tells_our_socket_from_another_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]

        assert procs.listens_on(os.getpid(), port)
        assert not procs.listens_on(os.getppid(), port)
    assert not procs.listens_on(os.getpid(), port)  # closed
