"""The object store's contract, held by both implementations: a folder, and a real S3-compatible
server on loopback (moto's)."""

from __future__ import annotations

import threading

import pytest

from plait.server.storage.objects import FolderObjects, ObjectStoreUnavailable, PreconditionFailed, open_object_store
from plait.server.storage.s3 import S3Objects


@pytest.fixture(params=["folder", "s3"])
def objects(request, tmp_path):
    if request.param == "folder":
        return FolderObjects(tmp_path / "store")
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return S3Objects(bucket, "some/prefix", endpoint_url=server.endpoint_url)


def test_write_read_list_delete(objects, tmp_path):
    assert objects.read("a/b") is None
    etag = objects.write("a/b", b"one")
    objects.write("a/c/d", b"two")
    objects.write("z", b"three")
    stored = objects.read("a/b")
    assert (stored.data, stored.etag) == (b"one", etag)
    assert [info.key for info in objects.list("a/")] == ["a/b", "a/c/d"]
    assert [info.key for info in objects.list("")] == ["a/b", "a/c/d", "z"]
    assert objects.list("a/")[0].etag == etag
    with objects.open("a/c/d") as stream:
        assert stream.read(2) == b"tw" and stream.read() == b"o"
    assert objects.open("missing") is None
    assert objects.download("a/c/d", tmp_path / "d") and (tmp_path / "d").read_bytes() == b"two"
    assert not objects.download("missing", tmp_path / "m") and not (tmp_path / "m").exists()
    (tmp_path / "big").write_bytes(b"x" * 100_000)
    objects.upload("up/loaded", tmp_path / "big")
    assert objects.read("up/loaded").data == b"x" * 100_000
    objects.delete("up/loaded")
    assert objects.copy("z", "y/z") and objects.read("y/z").data == b"three"
    assert not objects.copy("missing", "y/missing")
    objects.delete("a/b")
    objects.delete("a/b")  # nothing there: no error
    assert objects.read("a/b") is None
    objects.delete_prefix("a/")
    assert [info.key for info in objects.list("")] == ["y/z", "z"]


def test_conditional_writes(objects):
    first = objects.write("k", b"1", if_absent=True)
    with pytest.raises(PreconditionFailed):
        objects.write("k", b"2", if_absent=True)
    second = objects.write("k", b"3", if_match=first)
    assert second != first and objects.read("k").data == b"3"
    with pytest.raises(PreconditionFailed):
        objects.write("k", b"4", if_match=first)  # lost: someone replaced what it read
    with pytest.raises(PreconditionFailed):
        objects.write("gone", b"5", if_match=first)
    with pytest.raises(PreconditionFailed):
        objects.delete("k", if_match=first)
    objects.delete("k", if_match=second)
    assert objects.read("k") is None


def test_a_replaced_object_keeps_its_old_downloads(objects, tmp_path):
    objects.write("k", b"old")
    objects.download("k", tmp_path / "copy")
    objects.write("k", b"new")
    assert (tmp_path / "copy").read_bytes() == b"old"


def test_racing_conditional_writers_have_one_winner(objects):
    """Eight writers read the same version and replace it at once: exactly one wins."""
    base = objects.write("pointer", b"0")
    barrier, won, lost = threading.Barrier(8), [], []

    def race(n: int) -> None:
        barrier.wait()
        try:
            objects.write("pointer", str(n).encode(), if_match=base)
            won.append(n)
        except PreconditionFailed:
            lost.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert objects.read("pointer").data == str(won[0]).encode()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/.tmp-x"])
def test_keys_cannot_leave_the_store(tmp_path, key):
    with pytest.raises(ValueError):
        FolderObjects(tmp_path).write(key, b"x")


def test_store_urls(tmp_path, s3_server, s3_bucket):
    assert isinstance(open_object_store(f"file://{tmp_path}/a"), FolderObjects)
    assert open_object_store(str(tmp_path / "b")).root == tmp_path / "b"
    s3 = open_object_store(f"s3://{s3_bucket}/team", s3_endpoint_url=s3_server.endpoint_url)
    assert isinstance(s3, S3Objects) and s3.prefix == "team/"
    for bad in ("ftp://x/y", "s3:///nobucket", "file://otherhost/x"):
        with pytest.raises(ValueError):
            open_object_store(bad)


def test_a_missing_bucket_fails_at_start_in_one_line(s3_server, s3_bucket):
    with pytest.raises(ObjectStoreUnavailable) as caught:
        S3Objects("no-such-bucket-here", endpoint_url=s3_server.endpoint_url)
    assert "no-such-bucket-here" in str(caught.value) and "\n" not in str(caught.value)
