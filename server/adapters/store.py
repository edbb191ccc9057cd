"""The on-disk adapter store: a folder that survives restarts and only ever changes atomically.

Layout under `root`:

    <id>/v<version>/   adapter_config.json, adapter_model.safetensors, meta.json; never modified
    <id>/current       symlink to the published `v<version>`
    .staging-*/        an upload being written and validated

`put` writes and fsyncs the files into a staging folder inside `root`, validates them there,
renames the folder to `<id>/v<version>` and publishes it by renaming a new symlink over
`current`; both renames are atomic on POSIX. A reader resolves `current` once (`get` returns the
version folder itself, with its version) and reads from that folder, which never changes, so it
sees one whole version. `delete` removes `current` in one step, so the id is gone for every
reader at once.

A version is kept while it is current, while it is the one current before it (a reader that
resolved it just before a replacement can still finish), and while anyone holds it: `hold`
resolves an id and keeps that version's files until `release`, however often the adapter is
replaced or deleted meanwhile. A generation request holds the versions it uses until it ends.
A crash at any point leaves `current` naming the old version or the new one, each complete;
what else it leaves (staging folders, versions no longer kept, ids with no `current`) is
removed when a store is opened on `root`.

Ids are used as folder names as they are: `validate_adapter_id` leaves no `/`, no leading `.`
and no `..`, and Plait runs on Linux, where `:` is an ordinary file name character. No id starts
with `.`, so the store's own `.staging-*` folders never clash with an adapter.

One process writes a store: the server (the trainer publishes through it). A lock makes its
threads' writes, holds and releases one at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from plait.server.adapters.format import LoRAAdapter
from plait.server.adapters.uploads import MAX_ADAPTER_BYTES, check_files
from plait.server.errors import ClientError

log = logging.getLogger("plait.adapters")

META = "meta.json"
MAX_ADAPTER_ID_CHARS = 128
_ADAPTER_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]*")
_VERSION_DIR = re.compile(r"v(\d+)")
_CURRENT = "current"
_NEW_CURRENT = ".current-new"
_STAGING = ".staging-"


class InvalidAdapterId(ClientError):
    code = "invalid_adapter_id"

    def __init__(self, message: str):
        super().__init__(message, "id")


def validate_adapter_id(adapter_id: str) -> str:
    """Check an id as clients will use it for `model`, e.g. `ft:SmolLM2-135M-Instruct:mysuffix:ftjob-abc123`.

    1 to 128 of letters, digits, `_`, `.`, `:` and `-`, not starting with `.` or `-`, no `..`.
    """
    if not isinstance(adapter_id, str) or not adapter_id:
        raise InvalidAdapterId("an adapter id must be a non-empty string")
    if len(adapter_id) > MAX_ADAPTER_ID_CHARS:
        raise InvalidAdapterId(
            f"adapter id is {len(adapter_id)} characters; at most {MAX_ADAPTER_ID_CHARS} are allowed"
        )
    if not _ADAPTER_ID.fullmatch(adapter_id) or ".." in adapter_id:
        raise InvalidAdapterId(
            f"invalid adapter id {adapter_id!r}: use letters, digits, '_', '.', ':' and '-', "
            "not starting with '.' or '-', and no '..'"
        )
    return adapter_id


@dataclass(frozen=True)
class StoredAdapter:
    id: str
    version: int  # grows with every put to the store: (id, version) names one unchanging set of files
    path: Path  # the version's folder, which never changes while it exists
    created: int  # unix time the version was published
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int  # the two adapter files together
    base_model_name: str | None  # the base it names as trained on (base_model_name_or_path)


class AdapterStore:
    def __init__(self, root: Path, max_bytes: int = MAX_ADAPTER_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._holds: Counter[tuple[str, int]] = Counter()
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        self._last_version = max((v for d in self._adapter_dirs() for v in _versions(d)), default=0)

    def put(
        self, adapter_id: str, files: Mapping[str, bytes], validate: Callable[[Path], LoRAAdapter]
    ) -> StoredAdapter:
        """Store `files` (the adapter's two files by name) under `adapter_id`, replacing any adapter there.

        `validate(folder)` reads the files as written (usually `read_adapter` with the base
        model's targets) and raises to refuse them; a refused adapter leaves nothing behind.
        """
        validate_adapter_id(adapter_id)
        files = check_files(files, self.max_bytes)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.root))
        try:
            for name, data in files.items():
                write_durably(staging / name, data)
            adapter = validate(staging)
            with self._lock:
                self._last_version += 1
                meta = {
                    "id": adapter_id,
                    "version": self._last_version,
                    "created": int(time.time()),
                    "rank": adapter.rank,
                    "target_modules": list(adapter.target_modules),
                    "size_bytes": sum(len(data) for data in files.values()),
                    "base_model": adapter.base_model_name,
                }
                write_durably(staging / META, json.dumps(meta).encode())
                _fsync_dir(staging)
                return self._publish(staging, meta)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once published

    def get(self, adapter_id: str) -> StoredAdapter | None:
        """The adapter's published version, or None if there is none (or the id could never be one)."""
        try:
            adapter_dir = self.root / validate_adapter_id(adapter_id)
        except InvalidAdapterId:
            return None
        version = _current_version(adapter_dir)
        if version is None:
            return None
        path = adapter_dir / f"v{version}"
        try:
            meta = json.loads((path / META).read_text())
        except FileNotFoundError:
            return None  # deleted since `current` was read
        except (OSError, ValueError) as exc:
            log.warning("adapter store: %s cannot be read (%s); skipping %r", path / META, exc, adapter_id)
            return None
        return _stored(path, meta)

    def hold(self, adapter_id: str) -> StoredAdapter | None:
        """Like `get`, and the version's files stay until `release`, whatever happens to the id meanwhile."""
        with self._lock:
            stored = self.get(adapter_id)
            if stored is not None:
                self._holds[stored.id, stored.version] += 1
            return stored

    def release(self, adapter_id: str, version: int) -> None:
        """Give back one `hold`; a version nobody keeps any longer is removed."""
        with self._lock:
            self._holds[adapter_id, version] -= 1
            if self._holds[adapter_id, version] <= 0:
                del self._holds[adapter_id, version]
                self._prune(self.root / adapter_id)

    def version_path(self, adapter_id: str, version: int) -> Path:
        """The folder of one version (it exists while the version is kept; see the module's docstring)."""
        return self.root / validate_adapter_id(adapter_id) / f"v{version}"

    def list(self) -> list[StoredAdapter]:
        """Every published adapter, by id."""
        found = (self.get(d.name) for d in sorted(self._adapter_dirs()))
        return [adapter for adapter in found if adapter is not None]

    def delete(self, adapter_id: str) -> bool:
        """Remove the adapter; False if there was none. Held versions stay until released."""
        try:
            adapter_dir = self.root / validate_adapter_id(adapter_id)
        except InvalidAdapterId:
            return False
        with self._lock:
            if _current_version(adapter_dir) is None:
                return False
            (adapter_dir / _CURRENT).unlink()  # one atomic step: the id is gone for every reader
            _fsync_dir(adapter_dir)
            self._prune(adapter_dir)
        return True

    def _publish(self, staging: Path, meta: dict) -> StoredAdapter:
        adapter_id, version = meta["id"], meta["version"]
        adapter_dir = self.root / adapter_id
        adapter_dir.mkdir(exist_ok=True)
        replaced = _current_version(adapter_dir)
        os.rename(staging, adapter_dir / f"v{version}")
        new_current = adapter_dir / _NEW_CURRENT
        new_current.unlink(missing_ok=True)
        os.symlink(f"v{version}", new_current)
        os.replace(new_current, adapter_dir / _CURRENT)
        _fsync_dir(adapter_dir)
        self._prune(adapter_dir, previous=replaced)
        return _stored(adapter_dir / f"v{version}", meta)

    def _prune(self, adapter_dir: Path, previous: int | None = None) -> None:
        """Remove the versions of one id that nobody keeps (the caller holds the lock).

        Kept: the current version, `previous` (or, when not given, the newest version before
        the current one), and every held version. An id with nothing left goes altogether.
        """
        if not adapter_dir.is_dir():
            return
        versions = _versions(adapter_dir)
        current = _current_version(adapter_dir)
        if current is not None and previous is None:
            previous = max((v for v in versions if v < current), default=None)
        keep = {current, previous} | {v for (held_id, v) in self._holds if held_id == adapter_dir.name}
        _remove_versions(adapter_dir, keep)
        if current is None and not any(v in keep for v in versions):
            shutil.rmtree(adapter_dir, ignore_errors=True)

    def _recover(self) -> None:
        """Remove what an interrupted put or delete left behind, and versions nobody keeps any longer."""
        for entry in self.root.iterdir():
            if entry.name.startswith(_STAGING):
                shutil.rmtree(entry, ignore_errors=True)
        for adapter_dir in self._adapter_dirs():
            current = _current_version(adapter_dir)
            if current is None:
                shutil.rmtree(adapter_dir, ignore_errors=True)  # its first version was never published
                continue
            (adapter_dir / _NEW_CURRENT).unlink(missing_ok=True)
            self._prune(adapter_dir)

    def _adapter_dirs(self) -> list[Path]:
        """Folders under root named like adapters; anything else there is left alone."""
        return [d for d in self.root.iterdir() if d.is_dir() and is_adapter_id(d.name)]


def _stored(path: Path, meta: dict) -> StoredAdapter:
    return StoredAdapter(
        id=meta["id"],
        version=meta["version"],
        path=path,
        created=meta["created"],
        rank=meta["rank"],
        target_modules=tuple(meta["target_modules"]),
        size_bytes=meta["size_bytes"],
        base_model_name=meta.get("base_model"),
    )


def is_adapter_id(name: str) -> bool:
    try:
        validate_adapter_id(name)
    except InvalidAdapterId:
        return False
    return True


def _versions(adapter_dir: Path) -> list[int]:
    return [int(m.group(1)) for d in adapter_dir.iterdir() if (m := _VERSION_DIR.fullmatch(d.name))]


def _current_version(adapter_dir: Path) -> int | None:
    """The published version, if `current` names one that exists."""
    try:
        target = os.readlink(adapter_dir / _CURRENT)
    except OSError:
        return None
    match = _VERSION_DIR.fullmatch(target)
    if match is None or not (adapter_dir / target).is_dir():
        return None
    return int(match.group(1))


def _remove_versions(adapter_dir: Path, keep: set[int | None]) -> None:
    for version in _versions(adapter_dir):
        if version not in keep:
            shutil.rmtree(adapter_dir / f"v{version}", ignore_errors=True)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` survive a power cut, not only a crash of the process."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
