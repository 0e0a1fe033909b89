"""A stand-in for the few Hugging Face Hub HTTP endpoints huggingface_hub's `model_info`
and `hf_hub_download` call, on loopback (nothing reaches the internet):

GET  /api/models/{org}/{name}/revision/{revision}   id, sha, private, gated, siblings
HEAD/GET /{org}/{name}/resolve/{commit}/{file}       X-Repo-Commit, ETag, Content-Length

A private repository answers 401 `X-Error-Code: RepoNotFound` (as the hub does) unless
the request carries `Authorization: Bearer <its token>`.

And the ones `create_repo`, `create_branch` and `create_commit`/`upload_folder` call:

POST /api/repos/create                          {name, organization, visibility}
POST /api/validate-yaml                         (a README card's metadata: accepted)
POST /api/models/{org}/{name}/preupload/{rev}   every file "regular" (base64 in the commit)
POST /api/models/{org}/{name}/branch/{branch}
POST /api/models/{org}/{name}/commit/{rev}      NDJSON: header, then `file` lines

Writes need `Authorization: Bearer <token>` of a token in `writers` allowed the
namespace (401 without a known token, 403 for another namespace). `fail_creates` lists
statuses the next create_repo calls answer (429, 503: the client's retries). Pushed
commits are kept in `commits`; main's files replace `Repo.files`, a branch's go to
`Repo.branch_files`. The real hub would ask for LFS/Xet for large files: the stand-in
never does, which the pushed toy checkpoints (a few KiB) do not need."""

from __future__ import annotations

import base64
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
    branch_files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # not main

    @property
    def commit(self) -> str:
        return hashlib.sha1(repr(sorted(self.files.items())).encode()).hexdigest()


def repo_from_dir(directory: Path, **options) -> Repo:
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    repo = Repo(files, **options)
    repo.revisions["main"] = repo.commit
    return repo


@dataclass
class Commit:
    repo_id: str
    revision: str
    sha: str
    summary: str
    files: dict[str, bytes]  # what this commit added


class HubStandIn:
    def __init__(self, repos: dict[str, Repo], writers: dict[str, set[str]] | None = None):
        self.repos = repos
        self.writers = writers or {}  # token -> namespaces it may create and push to
        self.commits: list[Commit] = []
        self.fail_creates: list[int] = []
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

        def do_POST(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            length = int(self.headers.get("Content-Length") or 0)
            payload = self.rfile.read(length)
            parts = path.strip("/").split("/")
            if parts == ["api", "validate-yaml"]:
                self._json(200, {"errors": [], "warnings": []})
            elif parts == ["api", "repos", "create"]:
                self._create(json.loads(payload))
            elif parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                repo = self._writable(repo_id)
                if repo is None:
                    return
                if action == "preupload":
                    files = json.loads(payload)["files"]
                    answer = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ]
                    self._json(200, {"files": answer, "commitOid": repo.revisions.get("main")})
                elif action == "branch":
                    if revision in repo.revisions:
                        self._error(409, "BranchExists", True)
                        return
                    repo.revisions[revision] = repo.revisions.get("main", repo.commit)
                    repo.branch_files[revision] = dict(repo.files)
                    self._json(200, {})
                elif action == "commit":
                    self._commit_files(repo_id, repo, revision, payload)
                else:
                    self._error(404, "EntryNotFound", True)
            else:
                self._error(404, "EntryNotFound", True)

        def _writer(self, namespace: str) -> bool:
            """Answers 401/403 itself when the request may not write to `namespace`."""
            auth = self.headers.get("Authorization") or ""
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if token not in hub.writers:
                self._error(401, "InvalidCredentials", True)
                return False
            if namespace not in hub.writers[token]:
                self._error(403, "Forbidden", True)
                return False
            return True

        def _create(self, request: dict) -> None:
            repo_id = f"{request.get('organization')}/{request['name']}"
            if not self._writer(str(request.get("organization"))):
                return
            if hub.fail_creates:
                self._error(hub.fail_creates.pop(0), "Unavailable", True)
                return
            if repo_id in hub.repos:
                self._error(409, "RepoExists", True)
                return
            token = self.headers["Authorization"].removeprefix("Bearer ")
            private = request.get("visibility") == "private"
            repo = Repo({}, private=private, token=token)
            repo.revisions["main"] = repo.commit
            hub.repos[repo_id] = repo
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _writable(self, repo_id: str) -> Repo | None:
            if not self._writer(repo_id.split("/")[0]):
                return None
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", True)
            return repo

        def _commit_files(self, repo_id: str, repo: Repo, revision: str, payload: bytes) -> None:
            lines = [json.loads(line) for line in payload.decode().splitlines() if line.strip()]
            header = lines[0]
            assert header["key"] == "header", header
            added: dict[str, bytes] = {}
            for line in lines[1:]:
                if line["key"] != "file" or line["value"].get("encoding") != "base64":
                    self._error(400, "UnsupportedOperation", True)  # LFS: never asked for
                    return
                added[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            if revision == "main":
                repo.files = {**repo.files, **added}
                sha = repo.commit
            elif revision in repo.branch_files:
                repo.branch_files[revision] = {**repo.branch_files[revision], **added}
                sha = hashlib.sha1(repr(sorted(repo.branch_files[revision].items())).encode())
                sha = sha.hexdigest()
            else:
                self._error(404, "RevisionNotFound", True)
                return
            repo.revisions[revision] = sha
            summary = header["value"]["summary"]
            hub.commits.append(Commit(repo_id, revision, sha, summary, added))
            commit_url = f"{hub.url}/{repo_id}/commit/{sha}"
            self._json(200, {"commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self._send(status, data, {"Content-Type": "application/json"}, True)

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
