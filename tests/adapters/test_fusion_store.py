"""The fusion records on disk: whole or absent, immutable, and checked before they are written."""

from __future__ import annotations

import pytest

from plait.server.adapters.fusions import Fusion, FusionStore, check_fusion
from plait.server.errors import ClientError, Conflict


def _arrow(fusion_id="mix", **kw) -> Fusion:
    return Fusion(**{"id": fusion_id, "members": ("a", "b", "c"), "router": "arrow", "top_k": 2, **kw})


def test_put_get_list_delete_and_reopen(tmp_path):
    store = FusionStore(tmp_path)
    stored = store.put(_arrow(temperature=0.5))
    assert stored.created > 0 and stored.path == tmp_path / "mix"
    learned = store.put(Fusion("gated", ("a", "b"), "learned", 1), router_weights=b"gates")
    assert learned.router_file.read_bytes() == b"gates"
    reopened = FusionStore(tmp_path)
    assert [f.id for f in reopened.list()] == ["gated", "mix"]
    assert reopened.get("mix") == stored
    assert reopened.using("b") == ["gated", "mix"] and reopened.using("c") == ["mix"]
    assert reopened.delete("mix") and not reopened.delete("mix")
    assert reopened.get("mix") is None and not (tmp_path / "mix").exists()


def test_a_fusion_created_again_is_a_new_revision(tmp_path):
    store = FusionStore(tmp_path)
    first = store.put(_arrow())
    store.delete("mix")
    second = store.put(_arrow())
    assert first.created == second.created or first.created + 1 >= second.created
    assert first.revision and second.revision and first.revision != second.revision
    assert store.get("mix").revision == second.revision


def test_an_id_is_taken_once_and_leftovers_are_cleared(tmp_path):
    store = FusionStore(tmp_path)
    store.put(_arrow())
    with pytest.raises(Conflict):
        store.put(_arrow(top_k=1))
    assert store.get("mix").top_k == 2
    (tmp_path / ".staging-x").mkdir()  # what a crash mid-write leaves
    (tmp_path / ".trash-y").mkdir()
    assert [f.id for f in FusionStore(tmp_path).list()] == ["mix"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix"]


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
        FusionStore(tmp_path).put(fusion)
    assert list(tmp_path.iterdir()) == []


def test_router_weights_only_with_a_learned_router(tmp_path):
    store = FusionStore(tmp_path)
    with pytest.raises(ClientError, match="router_weights"):
        store.put(_arrow(), router_weights=b"x")
    with pytest.raises(ClientError, match="router_weights"):
        store.put(Fusion("gated", ("a", "b"), "learned", 1))
    assert list(tmp_path.iterdir()) == []
