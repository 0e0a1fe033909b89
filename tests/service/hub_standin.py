"""A stand-in for the few Hugging Face Hub HTTP endpoints huggingface_hub's `model_info`
and `hf_hub_download` call, on loopback (nothing reaches the internet):

GET  /api/models/{org}/{name}/revision/{revision}   id, sha, private, gated, siblings
HEAD/GET /{org}/{name}/resolve/{commit}/{file}       X-Repo-Commit, ETag, Content-Length

A private repository answers 401 `X-Error-Code: RepoNotFound` (as the hub does) unless
the request carries `Authorization: Bearer <its token>`."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    private: bool = False
    token: str | None = None
    revisions: dict[str, str] = field(default_factory=dict)  # branch -> commit

    @property
    def commit(self) -> str:
        return hashlib.sha1(repr(sorted(self.files.items())).encode()).hexdigest()


def repo_from_dir(directory: Path, **options) -> Repo:
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    repo = Repo(files, **options)
    repo.revisions["main"] = repo.commit
    return repo


class HubStandIn:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubStandIn:
        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
                self._info(f"{parts[2]}/{parts[3]}", "/".join(parts[5:]), body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
            else:
                self._error(404, "EntryNotFound", body)

        def _repo(self, repo_id: str, body: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            authorized = repo is not None and (
                not repo.private or self.headers.get("Authorization") == f"Bearer {repo.token}"
            )
            if not authorized:  # the hub does not tell private from absent
                self._error(401, "RepoNotFound", body)
                return None
            return repo

        def _commit(self, repo: Repo, revision: str) -> str | None:
            return revision if revision == repo.commit else repo.revisions.get(revision)

        def _info(self, repo_id: str, revision: str, body: bool) -> None:
            repo = self._repo(repo_id, body)
            if repo is None:
                return
            commit = self._commit(repo, revision)
            if commit is None:
                self._error(404, "RevisionNotFound", body)
                return
            siblings = [
                {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                for name, data in repo.files.items()
            ]
            info = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": repo.private,
                "gated": False,
                "siblings": siblings,
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

        def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            repo = self._repo(repo_id, body)
            if repo is None:
                return
            commit = self._commit(repo, revision)
            if commit is None:
                self._error(404, "RevisionNotFound", body)
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", body)
                return
            data = repo.files[name]
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(200, data, headers, body)

        def _error(self, status: int, code: str, body: bool) -> None:
            payload = json.dumps({"error": code}).encode()
            self._send(status, payload, {"X-Error-Code": code}, body)

        def _send(self, status: int, payload: bytes, headers: dict, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler
