"""The adapter store: published adapter versions in object storage, shared by every replica, and
a local copy of the versions this replica uses.

Objects (`plait.server.storage.objects`; a folder on one machine, a bucket for many):

    adapters/current/<id>                    the pointer: JSON naming the current version
    adapters/versions/<id>/<folder>/<file>   one version's two files, never changed

Local copies, under `cache_dir`:

    <id>/<folder>/      a version's files, fetched when first used
    .staging-*/         an upload being checked, or a download in progress

`put` checks the files in a local staging folder, uploads them under a new random folder, and
publishes them by a conditional write of the pointer: `if_absent` for a new id, `if_match` the
pointer it read otherwise. Versions count up per id and never repeat (a delete writes a
tombstone pointer that keeps the count). When two replicas publish at once, one write wins and
the other reads the new pointer and publishes again as the next version, up to
`PUBLISH_ATTEMPTS` times, then gives up with a 409: the pointer only ever names one complete
version. A crash before the pointer is written leaves objects no pointer names, which are
removed once they are older than `STALE_UPLOAD_SECONDS` (an upload may still be running on
another replica); a version replaced or deleted is removed from the objects at once.

Each replica keeps what it knows of the pointers in memory. `get` answers from it and, for an
id it has not seen (or saw deleted), reads the pointer from the store before saying there is
none, so an adapter published on another replica is servable at once. `refresh` (the server
calls it every `--store-poll-seconds`, and `list` calls it) lists the pointers, rereads those
that changed and tells `watch`ers which ids now name another version or none, so that every
replica frees the slots and caches of replaced and deleted adapters.

A request `hold`s the versions it uses: their files are fetched to the local copy first and
stay there until `release`, however the adapter is replaced or deleted meanwhile. A local copy
nobody holds is removed once its version is no longer current.

Ids are used in keys and folder names as they are: `validate_adapter_id` leaves no `/`, no
leading `.` and no `..`, and Plait runs on Linux, where `:` is an ordinary file name character.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from plait.server.adapters.format import LoRAAdapter
from plait.server.adapters.uploads import ADAPTER_FILES, MAX_ADAPTER_BYTES, check_files
from plait.server.errors import ClientError, Conflict
from plait.server.storage.objects import ObjectStore, PreconditionFailed

log = logging.getLogger("plait.adapters")

MAX_ADAPTER_ID_CHARS = 128
PUBLISH_ATTEMPTS = 8
STALE_UPLOAD_SECONDS = 3600.0
_ADAPTER_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]*")
_CURRENT = "adapters/current/"
_VERSIONS = "adapters/versions/"
_STAGING = ".staging-"
_LEGACY = ".legacy-"


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


def is_adapter_id(name: str) -> bool:
    try:
        validate_adapter_id(name)
    except InvalidAdapterId:
        return False
    return True


@dataclass(frozen=True)
class StoredAdapter:
    id: str
    version: int  # counts up with every put of this id: (id, version) names one unchanging set of files
    folder: str  # where the version's objects are, under adapters/versions/<id>/
    path: Path  # this replica's copy of the files: there once the version is held or fetched
    created: int  # unix time the version was published
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int  # the two adapter files together
    base_model_name: str | None  # the base it names as trained on (base_model_name_or_path)


@dataclass(frozen=True)
class _Pointer:
    etag: str
    version: int
    adapter: StoredAdapter | None  # None: deleted (a tombstone, which keeps the version count)


class AdapterStore:
    def __init__(self, objects: ObjectStore, cache_dir: Path, max_bytes: int = MAX_ADAPTER_BYTES):
        self.objects = objects
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fetching: dict[tuple[str, str], threading.Lock] = {}  # per version: a second request waits for the first
        self._pointers: dict[str, _Pointer] = {}
        self._holds: Counter[tuple[str, int]] = Counter()
        self._versions: dict[tuple[str, int], StoredAdapter] = {}  # every version seen, for `version_path`
        self._watchers: list[Callable[[str, int | None], None]] = []
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for entry in self.cache_dir.iterdir():
            if entry.name.startswith(_STAGING):
                shutil.rmtree(entry, ignore_errors=True)
        self.refresh()
        self._remove_stale_uploads()
        self._remove_old_local_copies()

    def watch(self, changed: Callable[[str, int | None], None]) -> None:
        """Call `changed(id, version)` whenever `refresh` finds an id naming another version, or
        none (deleted); this replica's own puts and deletes are not reported."""
        self._watchers.append(changed)

    # --- writing ----------------------------------------------------------------------------------

    def put(
        self, adapter_id: str, files: Mapping[str, bytes], validate: Callable[[Path], LoRAAdapter]
    ) -> StoredAdapter:
        """Store `files` (the adapter's two files by name) under `adapter_id`, replacing any adapter there.

        `validate(folder)` reads the files as written (usually `read_adapter` with the base
        model's targets) and raises to refuse them; a refused adapter leaves nothing behind.
        Conflict when other replicas kept replacing the id through every attempt.
        """
        validate_adapter_id(adapter_id)
        files = check_files(files, self.max_bytes)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.cache_dir))
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            adapter = validate(staging)
            folder = uuid.uuid4().hex[:16]
            for name, data in files.items():
                self.objects.write(f"{_VERSIONS}{adapter_id}/{folder}/{name}", data)
            facts = {
                "folder": folder,
                "rank": adapter.rank,
                "target_modules": list(adapter.target_modules),
                "size_bytes": sum(len(data) for data in files.values()),
                "base_model": adapter.base_model_name,
            }
            try:
                pointer, replaced = self._publish(adapter_id, facts)
            except Conflict:
                self.objects.delete_prefix(f"{_VERSIONS}{adapter_id}/{folder}/")
                raise
            stored = pointer.adapter
            with self._lock:
                stored.path.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(stored.path)
                self._remember(adapter_id, pointer)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once published
        self._remove_objects(adapter_id, replaced)
        return stored

    def delete(self, adapter_id: str) -> bool:
        """Remove the adapter; False if there was none. Held versions stay until released."""
        if not is_adapter_id(adapter_id):
            return False
        for _ in range(PUBLISH_ATTEMPTS):
            current = self._read_pointer(adapter_id)
            if current is None or current.adapter is None:
                with self._lock:
                    self._remember(adapter_id, current)
                return False
            version = current.version + 1
            record = {"id": adapter_id, "version": version, "deleted": True, "created": int(time.time())}
            try:
                etag = self.objects.write(_CURRENT + adapter_id, json.dumps(record).encode(), if_match=current.etag)
            except PreconditionFailed:
                continue
            with self._lock:
                self._remember(adapter_id, _Pointer(etag, version, None))
            self._remove_objects(adapter_id, current.adapter.folder)
            return True
        raise Conflict(f"The adapter '{adapter_id}' kept changing while it was deleted; try again.", "id")

    def _publish(self, adapter_id: str, facts: dict) -> tuple[_Pointer, str | None]:
        """Point `adapter_id` at the uploaded folder as its next version; the pointer and the
        folder it replaced."""
        for _ in range(PUBLISH_ATTEMPTS):
            current = self._read_pointer(adapter_id)
            version = 1 if current is None else current.version + 1
            record = {"id": adapter_id, "version": version, "created": int(time.time()), **facts}
            condition = {"if_absent": True} if current is None else {"if_match": current.etag}
            try:
                etag = self.objects.write(_CURRENT + adapter_id, json.dumps(record).encode(), **condition)
            except PreconditionFailed:
                continue  # another replica published first: this upload becomes the version after it
            replaced = current.adapter.folder if current is not None and current.adapter is not None else None
            return _Pointer(etag, version, self._stored(record)), replaced
        raise Conflict(
            f"The adapter '{adapter_id}' was replaced by other uploads {PUBLISH_ATTEMPTS} times while this one "
            "was stored; try again.",
            "id",
            "adapter_conflict",
        )

    # --- reading ----------------------------------------------------------------------------------

    def get(self, adapter_id: str, refresh: bool = True) -> StoredAdapter | None:
        """The adapter's current version, or None if there is none. Answered from what this replica
        knows; an id it does not know as an adapter is looked up in the store (unless `refresh` is
        False), so one published elsewhere is found at once."""
        if not is_adapter_id(adapter_id):
            return None
        with self._lock:
            known = self._pointers.get(adapter_id)
        if known is not None and known.adapter is not None:
            return known.adapter
        if not refresh:
            return None
        return self._reload(adapter_id)

    def hold(self, adapter_id: str, refresh: bool = True) -> StoredAdapter | None:
        """Like `get`; the version's files are on this machine (at `path`) when it returns, and stay
        until `release`, whatever happens to the id meanwhile."""
        stored = self.get(adapter_id, refresh)
        for _ in range(3):
            if stored is None:
                return None
            with self._lock:
                self._holds[stored.id, stored.version] += 1
            if self._fetch(stored):
                return stored
            self.release(stored.id, stored.version)
            stored = self._reload(adapter_id)  # replaced or deleted elsewhere since this replica looked
        return None

    def release(self, adapter_id: str, version: int) -> None:
        """Give back one `hold`; a local copy nobody keeps, of a version no longer current, is removed."""
        with self._lock:
            self._holds[adapter_id, version] -= 1
            if self._holds[adapter_id, version] <= 0:
                del self._holds[adapter_id, version]
                self._drop_local_copies(adapter_id)

    def version_path(self, adapter_id: str, version: int) -> Path:
        """The local folder of a version this replica has seen, its files fetched if they are not there
        (FileNotFoundError when the version is gone from the store and from this machine)."""
        with self._lock:
            stored = self._versions.get((adapter_id, version))
        if stored is None or not self._fetch(stored):
            raise FileNotFoundError(f"adapter {adapter_id!r} version {version} is no longer stored")
        return stored.path

    def list(self) -> list[StoredAdapter]:
        """Every published adapter, by id, as the store has them now."""
        self.refresh()
        with self._lock:
            return [p.adapter for _, p in sorted(self._pointers.items()) if p.adapter is not None]

    def refresh(self) -> None:
        """Catch up with the store: reread the pointers that changed, forget ids that are gone, and
        tell watchers about every id whose current version changed."""
        listed = {info.key[len(_CURRENT) :]: info.etag for info in self.objects.list(_CURRENT)}
        with self._lock:
            known = {adapter_id: p.etag for adapter_id, p in self._pointers.items()}
        for adapter_id in known.keys() - listed.keys():
            self._update(adapter_id, None)
        for adapter_id, etag in listed.items():
            if known.get(adapter_id) != etag and is_adapter_id(adapter_id):
                self._update(adapter_id, self._read_pointer(adapter_id))

    # --- inside -------------------------------------------------------------------------------------

    def _reload(self, adapter_id: str) -> StoredAdapter | None:
        self._update(adapter_id, self._read_pointer(adapter_id))
        with self._lock:
            pointer = self._pointers.get(adapter_id)
        return pointer.adapter if pointer is not None else None

    def _update(self, adapter_id: str, pointer: _Pointer | None) -> None:
        """Take in a pointer read from the store, and tell watchers when it names another version."""
        with self._lock:
            before = self._pointers.get(adapter_id)
            self._remember(adapter_id, pointer)
            pointer = self._pointers.get(adapter_id)
        was = before.adapter.version if before is not None and before.adapter is not None else None
        now = pointer.adapter.version if pointer is not None and pointer.adapter is not None else None
        if was != now and before is not None:
            for changed in self._watchers:
                changed(adapter_id, now)

    def _remember(self, adapter_id: str, pointer: _Pointer | None) -> None:
        """(The caller holds the lock.) A pointer older than the one known is ignored: versions only
        count up, and a slow read must not undo a newer one."""
        known = self._pointers.get(adapter_id)
        if known is not None and pointer is not None and pointer.version < known.version:
            return
        if pointer is None:
            self._pointers.pop(adapter_id, None)
        else:
            self._pointers[adapter_id] = pointer
            if pointer.adapter is not None:
                self._versions[adapter_id, pointer.version] = pointer.adapter
        self._drop_local_copies(adapter_id)

    def _drop_local_copies(self, adapter_id: str) -> None:
        """Remove this replica's copies of the id's versions that are neither current nor held (the
        caller holds the lock)."""
        pointer = self._pointers.get(adapter_id)
        current = pointer.adapter.version if pointer is not None and pointer.adapter is not None else None
        for key in [key for key in self._versions if key[0] == adapter_id]:
            if key[1] != current and key not in self._holds:
                shutil.rmtree(self._versions.pop(key).path, ignore_errors=True)
        id_dir = self.cache_dir / adapter_id
        if current is None and id_dir.is_dir() and not any(key[0] == adapter_id for key in self._holds):
            shutil.rmtree(id_dir, ignore_errors=True)

    def _fetch(self, stored: StoredAdapter) -> bool:
        """Bring the version's files to `stored.path`; False when the store no longer has them."""
        if stored.path.is_dir():
            return True
        with self._lock:
            fetching = self._fetching.setdefault((stored.id, stored.folder), threading.Lock())
        with fetching:
            if stored.path.is_dir():
                return True
            staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.cache_dir))
            try:
                for name in ADAPTER_FILES:
                    if not self.objects.download(f"{_VERSIONS}{stored.id}/{stored.folder}/{name}", staging / name):
                        return False
                stored.path.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(stored.path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                with self._lock:
                    self._fetching.pop((stored.id, stored.folder), None)
        return True

    def _read_pointer(self, adapter_id: str) -> _Pointer | None:
        found = self.objects.read(_CURRENT + adapter_id)
        if found is None:
            return None
        try:
            record = json.loads(found.data)
            adapter = None if record.get("deleted") else self._stored(record)
            return _Pointer(found.etag, int(record["version"]), adapter)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("adapter store: the pointer of %r cannot be read (%s); skipping it", adapter_id, exc)
            return None

    def _stored(self, record: dict) -> StoredAdapter:
        return StoredAdapter(
            id=record["id"],
            version=int(record["version"]),
            folder=record["folder"],
            path=self.cache_dir / record["id"] / record["folder"],
            created=int(record["created"]),
            rank=int(record["rank"]),
            target_modules=tuple(record["target_modules"]),
            size_bytes=int(record["size_bytes"]),
            base_model_name=record.get("base_model"),
        )

    def _remove_objects(self, adapter_id: str, folder: str | None) -> None:
        """Remove a replaced or deleted version's objects (local copies of it stay while held)."""
        if folder is not None:
            self.objects.delete_prefix(f"{_VERSIONS}{adapter_id}/{folder}/")

    def _remove_old_local_copies(self) -> None:
        """At start: local copies of versions that are no longer current (an earlier run's) go."""
        with self._lock:
            current = {(i, p.adapter.folder) for i, p in self._pointers.items() if p.adapter is not None}
        for id_dir in self.cache_dir.iterdir():
            if not id_dir.is_dir() or not is_adapter_id(id_dir.name):
                continue
            for folder in id_dir.iterdir():
                if (id_dir.name, folder.name) not in current:
                    shutil.rmtree(folder, ignore_errors=True)
            if not any(id_dir.iterdir()):
                id_dir.rmdir()

    def _remove_stale_uploads(self) -> None:
        """Remove version objects no pointer names that are too old to be an upload in progress."""
        with self._lock:
            current = {(i, p.adapter.folder) for i, p in self._pointers.items() if p.adapter is not None}
        cutoff = time.time() - STALE_UPLOAD_SECONDS
        newest: dict[tuple[str, str], float] = {}
        for info in self.objects.list(_VERSIONS):
            parts = info.key[len(_VERSIONS) :].split("/")
            if len(parts) == 3:
                key = (parts[0], parts[1])
                newest[key] = max(newest.get(key, 0.0), info.modified)
        for (adapter_id, folder), modified in newest.items():
            if (adapter_id, folder) not in current and modified < cutoff:
                log.info("adapter store: removing %s/%s, an upload that was never published", adapter_id, folder)
                self._remove_objects(adapter_id, folder)


def migrate_folder_layout(root: Path) -> None:
    """Move adapters an older Plait stored in `root` (`<root>/adapters/<id>/current`, a symlink to
    `v<n>/` beside it) into the object layout, once, at start."""
    adapters = root / "adapters"
    if not adapters.is_dir():
        return
    for adapter_dir in sorted(adapters.iterdir()):  # out of the way first: an id may be "current"
        if (adapter_dir / "current").is_symlink() and is_adapter_id(adapter_dir.name):
            adapter_dir.rename(adapters / f"{_LEGACY}{adapter_dir.name}")
    for legacy in sorted(adapters.glob(f"{_LEGACY}*")):
        adapter_id = legacy.name.removeprefix(_LEGACY)
        version_dir = legacy / Path((legacy / "current").readlink()).name
        meta = json.loads((version_dir / "meta.json").read_text())
        folder = f"v{meta['version']}"
        target = root / _VERSIONS / adapter_id / folder
        target.parent.mkdir(parents=True, exist_ok=True)
        (version_dir / "meta.json").unlink()
        version_dir.rename(target)
        pointer = {k: meta[k] for k in ("id", "version", "created", "rank", "target_modules", "size_bytes")}
        pointer.update(folder=folder, base_model=meta.get("base_model"))
        (root / _CURRENT).mkdir(parents=True, exist_ok=True)
        (root / _CURRENT / adapter_id).write_text(json.dumps(pointer))
        shutil.rmtree(legacy)
        log.info("adapter store: moved %r into the object layout", adapter_id)
