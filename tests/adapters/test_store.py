"""The on-disk adapter store and upload unpacking: atomic replacement, crash recovery, refusals."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from plait.server.adapters.errors import AdapterFormatError, AdapterTooLarge
from plait.server.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter, read_adapter
from plait.server.adapters.store import AdapterStore, InvalidAdapterId, validate_adapter_id
from plait.server.adapters.uploads import check_files, files_from_archive

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
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_put_get_list_delete(tmp_path):
    store = AdapterStore(tmp_path)
    files = adapter_files()

    stored = store.put("ft:SmolLM2-135M-Instruct:mine:ftjob-1", files, validate)

    assert stored.id == "ft:SmolLM2-135M-Instruct:mine:ftjob-1"
    assert (stored.rank, stored.target_modules) == (2, ("q_proj", "v_proj"))
    assert stored.size_bytes == sum(map(len, files.values()))
    assert read_files(stored.path) == files
    assert store.get(stored.id) == stored
    assert store.list() == [stored]
    assert store.delete(stored.id) is True
    assert store.get(stored.id) is None
    assert store.list() == []
    assert store.delete(stored.id) is False
    assert tree(tmp_path) == []


def test_adapters_survive_a_restart(tmp_path):
    first = AdapterStore(tmp_path)
    stored = [first.put(name, adapter_files(seed=i), validate) for i, name in enumerate(["b", "a"])]
    reopened = AdapterStore(tmp_path)
    assert reopened.list() == sorted(stored, key=lambda s: s.id)
    assert reopened.put("c", adapter_files(), validate).version > max(s.version for s in stored)


def test_replacement_bumps_the_version_and_old_readers_finish(tmp_path):
    store = AdapterStore(tmp_path)
    old_files, new_files = adapter_files(rank=2, seed=1), adapter_files(rank=4, seed=2)
    old = store.put("a", old_files, validate)
    with open(old.path / ADAPTER_WEIGHTS, "rb") as opened:  # a reader that started before the replacement
        new = store.put("a", new_files, validate)

        assert new.version > old.version
        assert store.get("a") == new
        assert read_files(new.path) == new_files
        assert read_files(old.path) == old_files  # the replaced version is kept for readers that resolved it
        store.put("a", adapter_files(seed=3), validate)
        assert not old.path.exists()  # two replacements later it is gone...
        assert opened.read() == old_files[ADAPTER_WEIGHTS]  # ...but a file already open reads whole


def test_a_held_version_outlives_replacements_and_deletion(tmp_path):
    """What a queued request relies on: the version it resolved stays readable until it is done."""
    store = AdapterStore(tmp_path)
    first_files = adapter_files(seed=1)
    store.put("a", first_files, validate)
    held = store.hold("a")
    for seed in range(2, 7):  # replaced five times while held
        store.put("a", adapter_files(seed=seed), validate)
    assert read_files(held.path) == first_files
    assert store.version_path("a", held.version) == held.path
    store.release("a", held.version)
    assert not held.path.exists()  # nobody keeps it any longer

    again = store.hold("a")
    assert store.delete("a") and store.get("a") is None and store.list() == []
    assert read_files(again.path) != {}  # deleted for every new reader, still whole for its holder
    store.put("b", adapter_files(), validate)
    assert [s.id for s in AdapterStore(tmp_path).list()] == ["b"]  # a deleted id does not come back
    store.release("a", again.version)
    assert not (tmp_path / "a").exists()


def test_two_holds_of_one_version_keep_it_until_both_release(tmp_path):
    store = AdapterStore(tmp_path)
    store.put("a", adapter_files(seed=1), validate)
    first, second = store.hold("a"), store.hold("a")
    store.put("a", adapter_files(seed=2), validate)
    store.put("a", adapter_files(seed=3), validate)
    store.release("a", first.version)
    assert second.path.exists()
    store.release("a", second.version)
    assert not second.path.exists()
    assert store.hold("missing") is None


def test_readers_never_see_a_mix_of_versions(tmp_path):
    """Replacements alternate between rank 2 and rank 4, so a config and weights from different
    versions would not read as an adapter at all."""
    store = AdapterStore(tmp_path)
    versions = [adapter_files(rank=2, seed=0), adapter_files(rank=4, seed=1)]
    store.put("a", versions[0], validate)
    done = threading.Event()
    problems: list[str] = []
    reads = []

    def read_continuously():
        while not done.is_set():
            reads.append(1)
            stored = store.get("a")
            try:
                files = read_files(stored.path)
            except FileNotFoundError:
                if store.get("a").version < stored.version + 2:
                    problems.append(f"version {stored.version} vanished after one replacement")
                continue
            if files not in versions:
                problems.append(f"version {stored.version} read as a mix")

    reader = threading.Thread(target=read_continuously)
    reader.start()
    for i in range(30):
        store.put("a", versions[i % 2], validate)
    done.set()
    reader.join()
    assert problems == []
    assert len(reads) > 1


def test_failed_validation_leaves_nothing(tmp_path):
    store = AdapterStore(tmp_path)
    with pytest.raises(AdapterFormatError, match="above this server's maximum"):
        store.put("a", adapter_files(rank=16), validate)
    assert tree(tmp_path) == []


def test_failed_replacement_keeps_the_old_version(tmp_path):
    store = AdapterStore(tmp_path)
    old = store.put("a", adapter_files(), validate)
    before = tree(tmp_path)
    broken = adapter_files() | {ADAPTER_CONFIG: b'{"peft_type": "LORA", "use_dora": true}'}
    with pytest.raises(AdapterFormatError, match="DoRA"):
        store.put("a", broken, validate)
    assert store.get("a") == old
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("files", "error", "words"),
    [
        (adapter_files() | {"../evil.json": b"{}"}, AdapterFormatError, "unexpected file '../evil.json'"),
        ({ADAPTER_CONFIG: adapter_files()[ADAPTER_CONFIG]}, AdapterFormatError, "adapter_model.safetensors is missing"),
        (adapter_files() | {ADAPTER_WEIGHTS: b"\0" * 5000}, AdapterTooLarge, "over the limit of 4096"),
    ],
)
def test_put_refuses_bad_files_before_writing(tmp_path, files, error, words):
    store = AdapterStore(tmp_path, max_bytes=4096)
    with pytest.raises(error, match=words.replace(".", r"\.")):
        store.put("a", files, validate)
    assert tree(tmp_path) == []


def test_opening_removes_what_interrupted_writes_left(tmp_path):
    store = AdapterStore(tmp_path)
    kept = store.put("kept", adapter_files(), validate)
    (tmp_path / ".staging-x1").mkdir()
    (tmp_path / ".staging-x1" / ADAPTER_WEIGHTS).write_bytes(b"half")
    (tmp_path / "never-published" / "v7").mkdir(parents=True)  # crashed before its first `current`
    (tmp_path / "kept" / "v99").mkdir()  # crashed between the rename and the pointer swap
    os.symlink("v99", tmp_path / "kept" / ".current-new")
    (tmp_path / "lost+found").mkdir()  # not an adapter id: not ours to touch

    reopened = AdapterStore(tmp_path)

    assert reopened.list() == [kept]
    assert tree(tmp_path) == sorted(
        ["kept", "kept/current", str(kept.path.relative_to(tmp_path)), "lost+found"]
        + [str((kept.path / name).relative_to(tmp_path)) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "meta.json")]
    )


def test_versions_are_never_reused_within_a_process(tmp_path):
    store = AdapterStore(tmp_path)
    first = store.put("a", adapter_files(), validate)
    store.delete("a")
    assert store.put("a", adapter_files(), validate).version > first.version


@pytest.mark.parametrize(
    "adapter_id",
    ["a", "ft:SmolLM2-135M-Instruct:mysuffix:ftjob-abc123", "my_adapter.v2", "A-1", "x" * 128],
)
def test_valid_adapter_ids(adapter_id):
    assert validate_adapter_id(adapter_id) == adapter_id


@pytest.mark.parametrize(
    "adapter_id", ["", "../x", "a/b", ".hidden", "-flag", "a..b", "..", "x" * 129, "a b", "a\\b", "é", "a\0"]
)
def test_invalid_adapter_ids(tmp_path, adapter_id):
    with pytest.raises(InvalidAdapterId):
        validate_adapter_id(adapter_id)
    store = AdapterStore(tmp_path)
    with pytest.raises(InvalidAdapterId):
        store.put(adapter_id, adapter_files(), validate)
    assert store.get(adapter_id) is None
    assert store.delete(adapter_id) is False
    assert tree(tmp_path) == []


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
    store = AdapterStore(tmp_path)
    archive = tar_bytes(in_folder("out", GOOD))
    stored = store.put("from-archive", files_from_archive(io.BytesIO(archive)), validate)
    assert read_files(stored.path) == GOOD
