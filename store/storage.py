"""Artifact and upload storage: a local directory by default, any fsspec URL (S3-compatible
object storage: `s3://bucket/prefix`) when workers span machines."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def job_prefix(job_id: str) -> str:
    """Where everything a job publishes lives (its checkpoint, reports, archive)."""
    return f"jobs/{job_id}"


class Storage:
    """Keys are relative, '/'-separated paths below the storage root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad storage key {key!r}")
        return f"{self.root}/{key}"

    def local_path(self, key: str) -> Path | None:
        """Where a key lives on this machine's disk, for local storage only."""
        path = self._path(key)
        return Path(path) if self.is_local else None

    def put_file(self, local: Path, key: str) -> None:
        if self.is_local:
            target = Path(self._path(key))
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        else:
            self.fs.put_file(str(local), self._path(key))

    def put_dir(self, local_dir: Path, prefix: str) -> None:
        """Upload every regular file of `local_dir` (flat) under `prefix/`."""
        for path in sorted(local_dir.iterdir()):
            if path.is_file():
                self.put_file(path, f"{prefix}/{path.name}")

    def get_file(self, key: str, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(key), str(local))
        return local

    def open(self, key: str) -> IO[bytes]:
        """A seekable binary reader."""
        return self.fs.open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def check(self) -> None:
        """Raise unless the storage root (local) or its bucket (remote) is reachable."""
        if self.is_local:
            if not os.access(self.root, os.W_OK):
                raise OSError(f"{self.root} is not writable")
        elif not self.fs.exists(self.root.split("/", 1)[0]):
            raise FileNotFoundError(f"bucket of {self.url} not found")

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def make_storage(settings: Any) -> Storage:
    options: dict[str, Any] = {}
    if settings.artifacts_location.startswith("s3://") and settings.s3_endpoint_url:
        options["client_kwargs"] = {"endpoint_url": settings.s3_endpoint_url}
    return Storage(settings.artifacts_location, options)
