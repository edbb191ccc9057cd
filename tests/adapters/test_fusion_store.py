"""The fusion records in a folder and in S3: whole or absent, immutable, shared by replicas, and
checked before they are written."""

from __future__ import annotations

import json

import pytest

from plait.server.adapters.fusions import Fusion, FusionStore, check_fusion, migrate_fusion_layout
from plait.server.errors import ClientError, Conflict
from plait.server.storage.objects import FolderObjects
from plait.server.storage.s3 import S3Objects


@pytest.fixture(params=["folder", "s3"])
def objects(request, tmp_path):
    if request.param == "folder":
        return FolderObjects(tmp_path / "store")
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return S3Objects(bucket, endpoint_url=server.endpoint_url)


def _arrow(fusion_id="mix", **kw) -> Fusion:
    return Fusion(**{"id": fusion_id, "members": ("a", "b", "c"), "router": "arrow", "top_k": 2, **kw})


def test_put_get_list_delete_and_reopen(objects):
    store = FusionStore(objects)
    stored = store.put(_arrow(temperature=0.5))
    assert stored.created > 0 and stored.revision
    learned = store.put(Fusion("gated", ("a", "b"), "learned", 1), router_weights=b"gates")
    assert store.router_weights(learned) == b"gates"
    reopened = FusionStore(objects)
    assert [f.id for f in reopened.list()] == ["gated", "mix"]
    assert reopened.get("mix") == stored
    assert reopened.using("b") == ["gated", "mix"] and reopened.using("c") == ["mix"]
    assert reopened.delete("mix") and not reopened.delete("mix")
    assert reopened.delete("gated")
    assert reopened.get("mix") is None and objects.list("fusions/") == []


def test_a_fusion_created_again_is_a_new_revision(objects):
    store = FusionStore(objects)
    first = store.put(_arrow())
    store.delete("mix")
    second = store.put(_arrow())
    assert first.revision and second.revision and first.revision != second.revision
    assert store.get("mix").revision == second.revision


def test_an_id_is_taken_once(objects):
    store = FusionStore(objects)
    store.put(_arrow())
    with pytest.raises(Conflict):
        FusionStore(objects).put(Fusion("mix", ("a", "b"), "learned", 1), router_weights=b"gates")  # another replica
    assert store.get("mix").top_k == 2
    assert [info.key for info in objects.list("fusions/")] == ["fusions/mix/fusion.json"]  # its gates removed


def test_replicas_see_each_others_fusions(objects):
    """A fusion made on one replica is found on another at once; its deletion reaches the other's
    watchers at the next refresh."""
    here, there = FusionStore(objects), FusionStore(objects)
    heard = []
    there.watch(heard.append)
    made = here.put(_arrow())
    assert there.get("mix") == made and there.get("mix", refresh=False) == made
    assert here.delete("mix")
    assert there.get("mix", refresh=False) == made  # not yet caught up
    there.refresh()
    assert there.get("mix") is None and heard == ["mix"]


def test_gates_stored_by_an_older_plait_get_their_revision_name(tmp_path):
    objects = FolderObjects(tmp_path)
    record = {"id": "g", "members": ["a", "b"], "router": "learned", "top_k": 1, "revision": "r1", "path": "/old"}
    objects.write("fusions/g/fusion.json", json.dumps(record).encode())
    objects.write("fusions/g/router.safetensors", b"gates")
    migrate_fusion_layout(objects)
    store = FusionStore(objects)
    assert store.router_weights(store.get("g")) == b"gates"
    assert objects.read("fusions/g/router.safetensors") is None


@pytest.mark.parametrize(
    ("fusion", "field"),
    [
        (_arrow(fusion_id="../x"), "id"),
        (_arrow(members=()), "members"),
        (_arrow(members=("a", "a")), "members"),
        (_arrow(top_k=4), "top_k"),
        (_arrow(temperature=0.0), "temperature"),
        (_arrow(temperature=1e-300), "temperature"),
        (Fusion("w", ("a", "b"), "weights", 2, weights=(1e308, 1.0)), "weights"),
        (_arrow(weights=(1.0, 1.0, 1.0)), "weights"),
        (Fusion("w", ("a", "b"), "weights", 2, weights=(1.0,)), "weights"),
        (Fusion("w", ("a", "b"), "weights", 2), "weights"),
        (_arrow(router="magic"), "router"),
    ],
)
def test_bad_fusions_name_the_field(tmp_path, fusion, field):
    with pytest.raises(ClientError, match=field) as refused:
        check_fusion(fusion)
    assert refused.value.param == field
    with pytest.raises(ClientError):
        FusionStore(FolderObjects(tmp_path)).put(fusion)
    assert list(tmp_path.iterdir()) == []


def test_router_weights_only_with_a_learned_router(tmp_path):
    store = FusionStore(FolderObjects(tmp_path))
    with pytest.raises(ClientError, match="router_weights"):
        store.put(_arrow(), router_weights=b"x")
    with pytest.raises(ClientError, match="router_weights"):
        store.put(Fusion("gated", ("a", "b"), "learned", 1))
    assert list(tmp_path.iterdir()) == []
