"""Object storage: named immutable blobs with conditional writes, in a folder or an S3 bucket.

Everything replicas share that is not a record (adapter versions, fusions, router weights,
fine-tuning file contents, a running job's inputs and checkpoint) is stored as objects under
keys like `adapters/versions/<id>/<folder>/adapter_model.safetensors`. Two implementations
give the same guarantees, and nothing above this interface knows which one it has:

- `FolderObjects` (`file:///path`, the single-machine default): a key is a file under the
  folder, written to a temporary name, fsynced and renamed into place.
- `S3Objects` (`s3://bucket/prefix`, in `plait.server.storage.s3`): AWS S3 or anything that
  speaks its API (MinIO, Ceph, R2, GCS's S3 interface).

A write either replaces the object whole or fails; readers never see part of one. The one
coordination primitive is the conditional write: `write(..., if_absent=True)` creates only
when the key is free, `write(..., if_match=etag)` replaces only the version the caller read
(S3's `If-None-Match: *` and `If-Match`). A writer that loses gets `PreconditionFailed` and
decides what to do: read again and retry, or tell its client.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

_TEMP = ".tmp-"
_LOCK_FILE = ".objects.lock"


class PreconditionFailed(Exception):
    """A conditional write or delete lost: the object exists, is gone, or changed since it was read."""


class ObjectStoreUnavailable(Exception):
    """The store cannot be used (no such bucket, no permission, nothing listening); one line says why."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    etag: str  # changes whenever the object is replaced
    modified: float  # unix time of the last write


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str


class ObjectStore(ABC):
    url: str  # where it is, for messages (no credentials)

    @abstractmethod
    def read(self, key: str) -> StoredObject | None:
        """The object and its etag, or None when there is none."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO | None:
        """The object as a stream to read and close (for answers too large to hold), or None."""

    @abstractmethod
    def download(self, key: str, path: Path) -> bool:
        """Copy the object into the new local file `path`; False when there is none."""

    @abstractmethod
    def write(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Store `data` under `key` and return its etag. With `if_absent`, only if the key is free;
        with `if_match`, only if the object's etag is still that one; PreconditionFailed otherwise."""

    @abstractmethod
    def upload(self, key: str, path: Path) -> None:
        """Store the local file `path` under `key` (streamed, for files too large to hold in memory)."""

    @abstractmethod
    def copy(self, source: str, target: str) -> bool:
        """Copy an object to another key without passing it through this process; False when
        `source` does not exist."""

    @abstractmethod
    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove the object (nothing when there is none); with `if_match`, only that version of it."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, by key."""

    def delete_prefix(self, prefix: str) -> None:
        for info in self.list(prefix):
            self.delete(info.key)


def open_object_store(url: str, *, s3_endpoint_url: str | None = None) -> ObjectStore:
    """`file:///path` or a plain path: a folder; `s3://bucket/prefix`: a bucket (credentials and
    region from the usual AWS variables and files, `s3_endpoint_url` for anything but AWS)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from plait.server.storage.s3 import S3Objects

        if not parsed.netloc:
            raise ValueError(f"--store {url}: an S3 URL names a bucket, s3://bucket/prefix")
        return S3Objects(parsed.netloc, parsed.path.strip("/"), endpoint_url=s3_endpoint_url)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ValueError(f"--store {url}: a file URL names a local folder, file:///path")
        return FolderObjects(Path(parsed.path if parsed.scheme else url))
    raise ValueError(f"--store {url}: use file:///path or s3://bucket/prefix")


def check_key(key: str) -> str:
    """Keys are made by Plait from checked ids; this keeps one that is not from leaving a folder."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") or p.startswith(_TEMP) for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class FolderObjects(ObjectStore):
    """Objects as files under a folder. Conditional writes are made atomic across this
    machine's processes by an exclusive lock on one file, so two servers on one folder are
    safe; a folder shared between machines (NFS) is not a supported store, S3 is."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreUnavailable(f"cannot use the folder {self.root}: {exc.strerror or exc}") from None
        self._lock = threading.Lock()

    def read(self, key: str) -> StoredObject | None:
        try:
            with open(self.root / check_key(key), "rb") as f:
                return StoredObject(f.read(), _etag(os.fstat(f.fileno())))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def open(self, key: str) -> BinaryIO | None:
        try:
            return open(self.root / check_key(key), "rb")  # noqa: SIM115 -- the caller closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def download(self, key: str, path: Path) -> bool:
        source = self.root / check_key(key)
        try:
            os.link(source, path)  # objects are never changed in place, so a link is a copy
        except FileNotFoundError:
            return False
        except OSError:  # another file system, or links not allowed
            try:
                shutil.copyfile(source, path)
            except FileNotFoundError:
                return False
        return True

    def write(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        path = self.root / check_key(key)
        fd, temp = _temp_file(path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                etag = _etag(os.fstat(f.fileno()))  # the renamed file keeps its inode and times
            with self._conditional(if_absent or if_match is not None):
                if if_absent and path.exists():
                    raise PreconditionFailed(key)
                if if_match is not None and (current := self.read(key)) is not None and current.etag != if_match:
                    raise PreconditionFailed(key)
                if if_match is not None and current is None:
                    raise PreconditionFailed(key)
                os.replace(temp, path)
            _fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return etag

    def upload(self, key: str, path: Path) -> None:
        target = self.root / check_key(key)
        fd, temp = _temp_file(target.parent)
        os.close(fd)
        try:
            shutil.copyfile(path, temp)
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        _fsync_dir(target.parent)

    def copy(self, source: str, target: str) -> bool:
        target_path = self.root / check_key(target)
        fd, temp = _temp_file(target_path.parent)
        os.close(fd)
        os.unlink(temp)
        try:
            if not self.download(source, Path(temp)):
                return False
            os.replace(temp, target_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return True

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        path = self.root / check_key(key)
        with self._conditional(if_match is not None):
            if if_match is not None:
                current = self.read(key)
                if current is None or current.etag != if_match:
                    raise PreconditionFailed(key)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _remove_empty_parents(path.parent, self.root)

    def list(self, prefix: str) -> list[ObjectInfo]:
        found = []
        for folder, dirs, files in os.walk(self.root):
            relative = os.path.relpath(folder, self.root)
            base = "" if relative == "." else relative + "/"
            if not (base.startswith(prefix) or prefix.startswith(base)):
                dirs.clear()
                continue
            for name in files:
                key = base + name
                if key.startswith(prefix) and not name.startswith(_TEMP) and name != _LOCK_FILE:
                    try:
                        stat = os.stat(os.path.join(folder, name))
                    except FileNotFoundError:
                        continue
                    found.append(ObjectInfo(key, _etag(stat), stat.st_mtime))
        return sorted(found, key=lambda info: info.key)

    @contextlib.contextmanager
    def _conditional(self, needed: bool):
        """Holds this process's lock and the folder's lock file, when a condition must be checked."""
        if not needed:
            yield
            return
        with self._lock, open(self.root / _LOCK_FILE, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield


def _etag(stat: os.stat_result) -> str:
    """Every write is a new file renamed into place: its inode, time and size name the version."""
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _temp_file(folder: Path) -> tuple[int, str]:
    """A new temporary file in `folder`, made with its parents (which a delete may be removing)."""
    for _ in range(3):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(prefix=_TEMP, dir=folder)
        except FileNotFoundError:
            continue
    return tempfile.mkstemp(prefix=_TEMP, dir=folder)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` survive a power cut, not only a crash of the process."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_empty_parents(folder: Path, root: Path) -> None:
    while folder != root:
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            return
        folder = folder.parent
