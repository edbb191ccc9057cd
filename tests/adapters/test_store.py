"""The adapter store, on a folder and on a real S3 server, alone and as several replicas: atomic
replacement, races, what each replica sees and keeps, crash recovery, refusals; and upload unpacking."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from plait.server.adapters import store as store_module
from plait.server.adapters.errors import AdapterFormatError, AdapterTooLarge
from plait.server.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter, read_adapter
from plait.server.adapters.store import (
    STALE_UPLOAD_SECONDS,
    AdapterStore,
    InvalidAdapterId,
    migrate_folder_layout,
    validate_adapter_id,
)
from plait.server.adapters.uploads import check_files, files_from_archive
from plait.server.errors import Conflict
from plait.server.storage.objects import FolderObjects
from plait.server.storage.s3 import S3Objects

TARGETS = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 4)}


def adapter_files(rank: int = 2, seed: int = 0) -> dict[str, bytes]:
    """A small valid PEFT adapter for TARGETS, written directly."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (in_features, out_features) in TARGETS.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]}
    return {ADAPTER_CONFIG: json.dumps(config).encode(), ADAPTER_WEIGHTS: safetensors.torch.save(tensors)}


def validate(folder: Path) -> LoRAAdapter:
    return read_adapter(folder, TARGETS, max_rank=8)


def read_files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".objects.lock")


@pytest.fixture(params=["folder", "s3"])
def objects(request, tmp_path):
    if request.param == "folder":
        return FolderObjects(tmp_path / "store")
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return S3Objects(bucket, "team", endpoint_url=server.endpoint_url)


@pytest.fixture
def replicas(objects, tmp_path):
    """`replicas(n)`: n stores on the same objects, each with its local copies in a folder of its own."""
    made = []

    def make(count: int = 1, max_bytes: int = 2**20) -> list[AdapterStore]:
        for _ in range(count):
            made.append(AdapterStore(objects, tmp_path / f"replica-{len(made)}", max_bytes=max_bytes))
        return made[-count:]

    return make


def keys(objects) -> list[str]:
    return [info.key for info in objects.list("")]


def test_put_get_list_delete(replicas, objects):
    (store,) = replicas()
    files = adapter_files()
    stored = store.put("a", files, validate)
    assert (stored.id, stored.version, stored.rank) == ("a", 1, 2)
    assert stored.target_modules == ("q_proj", "v_proj") and stored.size_bytes == sum(map(len, files.values()))
    assert read_files(stored.path) == files
    assert store.get("a") == stored and store.list() == [stored]
    assert store.delete("a") and not store.delete("a")
    assert store.get("a") is None and store.list() == []
    assert keys(objects) == ["adapters/current/a"]  # a tombstone: versions of "a" count on from it
    assert not stored.path.exists()


def test_adapters_survive_a_restart(replicas):
    (store,) = replicas()
    stored = store.put("a", adapter_files(), validate)
    (reopened,) = replicas()  # a fresh replica (or the same one restarted) with nothing local yet
    found = reopened.get("a")
    assert (found.id, found.version, found.folder) == ("a", 1, stored.folder)
    held = reopened.hold("a")
    assert read_files(held.path) == adapter_files()


def test_replacement_bumps_the_version_and_holders_keep_theirs(replicas, objects):
    (store,) = replicas()
    old_files, new_files = adapter_files(seed=1), adapter_files(seed=2)
    store.put("a", old_files, validate)
    held = store.hold("a")
    new = store.put("a", new_files, validate)
    assert new.version == held.version + 1 and store.get("a") == new
    assert read_files(new.path) == new_files
    assert read_files(held.path) == old_files  # kept locally for the request holding it...
    assert [k for k in keys(objects) if "versions" in k] == [
        f"adapters/versions/a/{new.folder}/{name}" for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    ]  # ...while the store has only the current version
    store.release("a", held.version)
    assert not held.path.exists() and new.path.exists()  # the current version's copy stays


def test_a_held_version_outlives_deletion(replicas):
    (store,) = replicas()
    store.put("a", adapter_files(), validate)
    held = store.hold("a")
    assert store.delete("a")
    assert store.get("a") is None and store.hold("a") is None
    assert store.version_path("a", held.version) == held.path and read_files(held.path) == adapter_files()
    store.release("a", held.version)
    assert not held.path.exists()


def test_two_holds_of_one_version_keep_it_until_both_release(replicas):
    (store,) = replicas()
    store.put("a", adapter_files(), validate)
    first, second = store.hold("a"), store.hold("a")
    store.delete("a")
    store.release("a", first.version)
    assert second.path.exists()
    store.release("a", second.version)
    assert not second.path.exists()


def test_another_replica_finds_a_new_adapter_at_once_and_hears_of_changes_when_it_refreshes(replicas):
    here, there = replicas(2)
    heard = []
    there.watch(lambda adapter_id, version: heard.append((adapter_id, version)))
    first = here.put("a", adapter_files(seed=1), validate)
    held = there.hold("a")  # never seen there: looked up in the store, and fetched
    assert (held.version, held.folder) == (first.version, first.folder)
    assert read_files(held.path) == adapter_files(seed=1)
    there.release("a", held.version)

    second = here.put("a", adapter_files(seed=2), validate)
    assert there.get("a").version == first.version  # known there, so answered from memory until...
    there.refresh()
    assert there.get("a").version == second.version and heard == [("a", second.version)]
    assert not held.path.exists()  # the replaced version's local copy went with it

    here.delete("a")
    there.refresh()
    assert there.get("a") is None and heard[-1] == ("a", None)


def test_a_version_replaced_elsewhere_before_it_was_fetched_is_looked_up_again(replicas):
    here, there = replicas(2)
    here.put("a", adapter_files(seed=1), validate)
    assert there.get("a").version == 1  # known there, files not fetched yet
    here.put("a", adapter_files(seed=2), validate)  # version 1's objects are gone now
    held = there.hold("a")
    assert held.version == 2 and read_files(held.path) == adapter_files(seed=2)


def test_racing_uploads_of_one_id_end_with_one_whole_version(replicas, objects):
    """Eight replicas upload the same id at once: each upload becomes a version of its own or a 409,
    and the pointer names exactly one complete version, the newest."""
    stores = replicas(8)
    barrier, results = threading.Barrier(8), {}

    def upload(n: int) -> None:
        barrier.wait()
        try:
            results[n] = stores[n].put("a", adapter_files(seed=n), validate)
        except Conflict as exc:
            results[n] = exc

    threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = {n: r for n, r in results.items() if not isinstance(r, Conflict)}
    assert len(results) == 8 and stored
    assert all(r.status == 409 for r in results.values() if isinstance(r, Conflict))
    versions = sorted(r.version for r in stored.values())
    assert versions == list(range(1, len(stored) + 1))  # no version was given twice
    (reader,) = replicas()
    current = reader.hold("a")
    winner = next(n for n, r in stored.items() if r.version == current.version)
    assert current.version == versions[-1] and read_files(current.path) == adapter_files(seed=winner)
    assert [k for k in keys(objects) if "versions" in k] == [
        f"adapters/versions/a/{current.folder}/{name}" for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    ]


def test_readers_never_see_a_mix_of_versions(replicas):
    (store,) = replicas()
    versions = {n: adapter_files(seed=n) for n in range(6)}
    store.put("a", versions[0], validate)
    errors, done = [], threading.Event()

    def read_continuously():
        while not done.is_set():
            held = store.hold("a")
            try:
                if read_files(held.path) not in versions.values():
                    errors.append("a mix of versions")
            finally:
                store.release("a", held.version)

    readers = [threading.Thread(target=read_continuously) for _ in range(3)]
    for r in readers:
        r.start()
    for n in range(1, 6):
        store.put("a", versions[n], validate)
    done.set()
    for r in readers:
        r.join()
    assert errors == []


def test_failed_validation_leaves_nothing(replicas, objects, tmp_path):
    (store,) = replicas()
    with pytest.raises(AdapterFormatError, match="above this server's maximum"):
        store.put("a", adapter_files(rank=16), validate)
    assert keys(objects) == [] and tree(tmp_path / "replica-0") == []


def test_failed_replacement_keeps_the_old_version(replicas, objects):
    (store,) = replicas()
    old = store.put("a", adapter_files(), validate)
    before = keys(objects)
    broken = adapter_files() | {ADAPTER_CONFIG: b'{"peft_type": "LORA", "use_dora": true}'}
    with pytest.raises(AdapterFormatError, match="DoRA"):
        store.put("a", broken, validate)
    assert store.get("a") == old and keys(objects) == before


@pytest.mark.parametrize(
    ("files", "error", "words"),
    [
        (adapter_files() | {"../evil.json": b"{}"}, AdapterFormatError, "unexpected file '../evil.json'"),
        ({ADAPTER_CONFIG: adapter_files()[ADAPTER_CONFIG]}, AdapterFormatError, "adapter_model.safetensors is missing"),
        (adapter_files() | {ADAPTER_WEIGHTS: b"\0" * 5000}, AdapterTooLarge, "over the limit of 4096"),
    ],
)
def test_put_refuses_bad_files_before_writing(replicas, objects, files, error, words):
    (store,) = replicas(max_bytes=4096)
    with pytest.raises(error, match=words.replace(".", r"\.")):
        store.put("a", files, validate)
    assert keys(objects) == []


def test_opening_removes_what_interrupted_writes_left(replicas, objects, tmp_path):
    (store,) = replicas()
    kept = store.put("kept", adapter_files(), validate)
    objects.write("adapters/versions/kept/crashed/adapter_config.json", b"{}")  # an upload never published
    objects.write("adapters/versions/other/crashed/adapter_config.json", b"{}")
    (tmp_path / "replica-1" / ".staging-x1").mkdir(parents=True)  # a download cut off
    old = time.time() - STALE_UPLOAD_SECONDS - 60
    if isinstance(objects, FolderObjects):
        for path in objects.root.rglob("crashed/*"):
            os.utime(path, (old, old))
    else:  # S3 keeps its own times: pretend the clock moved on instead
        store_module.STALE_UPLOAD_SECONDS = -1.0
    try:
        (reopened,) = replicas()
    finally:
        store_module.STALE_UPLOAD_SECONDS = STALE_UPLOAD_SECONDS
    assert reopened.list() == [dataclasses.replace(kept, path=tmp_path / "replica-1" / "kept" / kept.folder)]
    assert "crashed" not in str(keys(objects)) and tree(tmp_path / "replica-1") == []


def test_a_restart_keeps_only_local_copies_of_current_versions(objects, tmp_path):
    store = AdapterStore(objects, tmp_path / "local")
    store.put("a", adapter_files(seed=1), validate)
    held = store.hold("a")
    current = store.put("a", adapter_files(seed=2), validate)
    assert held.path.exists()  # held when the server stopped: never released
    AdapterStore(objects, tmp_path / "local")
    assert not held.path.exists() and read_files(current.path) == adapter_files(seed=2)


def test_a_recent_unpublished_upload_is_left_alone(replicas, objects):
    """It may be another replica's upload in progress."""
    replicas()
    objects.write("adapters/versions/a/uploading/adapter_config.json", b"{}")
    replicas()
    assert keys(objects) == ["adapters/versions/a/uploading/adapter_config.json"]


def test_versions_are_never_reused(replicas):
    (store,) = replicas()
    first = store.put("a", adapter_files(), validate)
    store.delete("a")
    (restarted,) = replicas()
    assert restarted.put("a", adapter_files(), validate).version > first.version


def test_adapters_stored_by_an_older_plait_move_into_the_object_layout(tmp_path):
    old = tmp_path / "data" / "adapters"
    for adapter_id, version in (("current", 3), ("ft:base::ftjob-1", 7)):
        (old / adapter_id / f"v{version}").mkdir(parents=True)
        for name, data in adapter_files(seed=version).items():
            (old / adapter_id / f"v{version}" / name).write_bytes(data)
        meta = {"id": adapter_id, "version": version, "created": 1, "rank": 2, "target_modules": ["q_proj", "v_proj"]}
        (old / adapter_id / f"v{version}" / "meta.json").write_text(json.dumps({**meta, "size_bytes": 10}))
        os.symlink(f"v{version}", old / adapter_id / "current")
    migrate_folder_layout(tmp_path / "data")
    store = AdapterStore(FolderObjects(tmp_path / "data"), tmp_path / "cache")
    assert [(a.id, a.version) for a in store.list()] == [("current", 3), ("ft:base::ftjob-1", 7)]
    assert read_files(store.hold("current").path) == adapter_files(seed=3)
    migrate_folder_layout(tmp_path / "data")  # once only: nothing left to move
    assert len(AdapterStore(FolderObjects(tmp_path / "data"), tmp_path / "cache2").list()) == 2


@pytest.mark.parametrize(
    "adapter_id",
    ["a", "ft:SmolLM2-135M-Instruct:mysuffix:ftjob-abc123", "my_adapter.v2", "A-1", "x" * 128],
)
def test_valid_adapter_ids(adapter_id):
    assert validate_adapter_id(adapter_id) == adapter_id


@pytest.mark.parametrize(
    "adapter_id", ["", "../x", "a/b", ".hidden", "-flag", "a..b", "..", "x" * 129, "a b", "a\\b", "é", "a\0"]
)
def test_invalid_adapter_ids(replicas, objects, adapter_id):
    with pytest.raises(InvalidAdapterId):
        validate_adapter_id(adapter_id)
    (store,) = replicas()
    with pytest.raises(InvalidAdapterId):
        store.put(adapter_id, adapter_files(), validate)
    assert store.get(adapter_id) is None
    assert store.delete(adapter_id) is False
    assert keys(objects) == []


# Uploads: two files by name, or one archive.


def test_check_files_keeps_the_two_files():
    files = adapter_files()
    assert check_files(files) == files


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(
    members: dict[str, bytes], mode: str = "w:gz", links: dict[str, tuple[bytes, str]] | None = None
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def in_folder(folder: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{folder}/{name}": data for name, data in files.items()}


GOOD = adapter_files()


@pytest.mark.parametrize(
    "archive",
    [
        pytest.param(zip_bytes(GOOD), id="zip"),
        pytest.param(zip_bytes(in_folder("my-adapter", GOOD) | {"my-adapter/README.md": b"# hi"}), id="zip-folder"),
        pytest.param(zip_bytes(in_folder("./x", GOOD), zipfile.ZIP_STORED), id="zip-stored-dot-folder"),
        pytest.param(tar_bytes(GOOD, "w"), id="tar"),
        pytest.param(tar_bytes(in_folder("checkpoint-100", GOOD) | {"checkpoint-100/args.json": b"{}"}), id="tar.gz"),
        pytest.param(tar_bytes(GOOD, "w:bz2"), id="tar.bz2"),
        pytest.param(tar_bytes(GOOD, "w:xz"), id="tar.xz"),
    ],
)
def test_archives_give_the_two_files(archive):
    assert files_from_archive(io.BytesIO(archive)) == GOOD


def symlinked_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in GOOD.items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("README.md")
        link.external_attr = (0o120777 << 16) | 0  # a symlink, as Info-ZIP stores one
        zf.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def lying_zip() -> bytes:
    """The weights member declares 100 bytes but holds 4 KiB."""
    data = bytearray(zip_bytes({ADAPTER_CONFIG: GOOD[ADAPTER_CONFIG], ADAPTER_WEIGHTS: b"\0" * 4096}))
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := data.find(signature, start)) != -1:
            if data[start + size_offset : start + size_offset + 4] == (4096).to_bytes(4, "little"):
                data[start + size_offset : start + size_offset + 4] = (100).to_bytes(4, "little")
            start += 4
    return bytes(data)


@pytest.mark.parametrize(
    ("archive", "error", "words"),
    [
        (zip_bytes({"../adapter_config.json": b"{}"} | GOOD), AdapterFormatError, "escaping path"),
        (tar_bytes({"/etc/adapter_config.json": b"{}"} | GOOD), AdapterFormatError, "absolute or escaping"),
        (tar_bytes(in_folder("a/../..", GOOD)), AdapterFormatError, "escaping path"),
        (tar_bytes(GOOD, links={"x": (tarfile.SYMTYPE, "/etc/passwd")}), AdapterFormatError, "is a symbolic link"),
        (tar_bytes(GOOD, links={"x": (tarfile.LNKTYPE, ADAPTER_CONFIG)}), AdapterFormatError, "is a hard link"),
        (symlinked_zip(), AdapterFormatError, "'README.md' is a symbolic link"),
        (zip_bytes({ADAPTER_CONFIG: GOOD[ADAPTER_CONFIG]}), AdapterFormatError, "no adapter_model.safetensors"),
        (zip_bytes(in_folder("a/b", GOOD)), AdapterFormatError, "no adapter_config.json at its top level"),
        (zip_bytes(in_folder("a", GOOD) | in_folder("b", GOOD)), AdapterFormatError, "more than one adapter_config"),
        (
            zip_bytes(
                {ADAPTER_CONFIG: GOOD[ADAPTER_CONFIG]} | in_folder("a", {ADAPTER_WEIGHTS: GOOD[ADAPTER_WEIGHTS]})
            ),
            AdapterFormatError,
            "not in the same folder",
        ),
        (
            zip_bytes(GOOD | {"optimizer.pt": b"\0" * (2**20 + 1)}),
            AdapterFormatError,
            "'optimizer.pt' is 1048577 bytes",
        ),
        (tar_bytes(GOOD | {"optimizer.pt": b"\0" * (2**20 + 1)}), AdapterFormatError, "other files only up to"),
        (b"neither zip nor tar" * 40, AdapterFormatError, "not a readable zip or tar archive"),
        (zip_bytes(GOOD)[:-30], AdapterFormatError, "not a readable zip or tar archive"),
        (lying_zip(), AdapterFormatError, "not a readable zip or tar archive"),
    ],
)
def test_archive_refusals(archive, error, words):
    with pytest.raises(error) as info:
        files_from_archive(io.BytesIO(archive))
    assert words in info.value.message


@pytest.mark.parametrize(
    "archive",
    [
        pytest.param(zip_bytes(GOOD | {ADAPTER_WEIGHTS: b"\0" * (4 * 2**20)}), id="zip-of-zeros"),
        pytest.param(tar_bytes(GOOD | {ADAPTER_WEIGHTS: b"\0" * (4 * 2**20)}), id="tar.gz-of-zeros"),
    ],
)
def test_archives_expanding_past_the_limit_are_refused(archive):
    assert len(archive) < 2**16  # small on the wire
    with pytest.raises(AdapterTooLarge):
        files_from_archive(io.BytesIO(archive), max_bytes=2**20)


def test_a_huge_tar_header_is_refused_while_decompressing():
    """tarfile reads a pax header whole; the limit must stop it before it fills memory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(ADAPTER_CONFIG)
        info.pax_headers = {"comment": "x" * (8 * 2**20)}
        tar.addfile(info, io.BytesIO(b""))
    assert len(buffer.getvalue()) < 2**16
    with pytest.raises(AdapterTooLarge):
        files_from_archive(io.BytesIO(buffer.getvalue()), max_bytes=2**20)


def test_an_uploaded_archive_goes_into_the_store(tmp_path):
    store = AdapterStore(FolderObjects(tmp_path / "store"), tmp_path / "cache")
    archive = tar_bytes(in_folder("out", GOOD))
    stored = store.put("from-archive", files_from_archive(io.BytesIO(archive)), validate)
    assert read_files(stored.path) == GOOD
