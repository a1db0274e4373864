"""A device revoked in the registry (REST or CLI, with or without a managed broker) is out of every
later round and its results are refused as `revoked_device` — also after a server restart."""

from __future__ import annotations

from device_firmware_py.contract import messages as cm
from server_app.ingest import Presence


def _status(dev: str) -> cm.DeviceStatus:
    return cm.DeviceStatus(device_id=dev, state="online", arch="cnn_small", num_samples=10, label_histogram=[1] * 10)


def test_revoked_device_is_never_online():
    p = Presence()
    p.update(_status("a"))
    p.update(_status("b"))
    assert p.online_count() == 2
    p.set_revoked("a")
    assert [d.device_id for d in p.online()] == ["b"] and p.online_count() == 1
    p.update(_status("a"))  # a fresh status from the revoked device changes nothing
    assert p.online_count() == 1
    p.set_revoked("a", False)
    assert sorted(d.device_id for d in p.online()) == ["a", "b"] and p.online_count() == 2


def test_registry_revocation_is_loaded_at_start_and_refuses_results(registry, tmp_path):
    from device_firmware_py.contract import codec, topics
    from server_app.ingest import Ingestor
    from server_app.registry import crud
    from server_app.rounds.store import RegistryStore

    registry.run(crud.upsert_device_status, "bad", status="online", arch="cnn_small")
    registry.run(crud.revoke_device, "bad", True)
    assert registry.run(crud.revoked_device_ids) == ["bad"]
    presence = Presence()
    for dev in registry.run(crud.revoked_device_ids):
        presence.set_revoked(dev)
    store = RegistryStore(registry, tmp_path)
    store.ensure_round(0, "test", {}, 0)
    store.assignments_sent(0, {"bad": 10}, 4e9)
    ing = Ingestor(store, presence, lambda: None)
    r = cm.Result(round_id=0, device_id="bad", arch="cnn_small", num_samples=10, label_histogram=[1] * 10)
    out = ing.ingest_batch([(topics.device_result("bad"), codec.encode_frame(r))])[0]
    assert (out.status, out.reason) == ("rejected", "revoked_device")


def test_presence_follows_revocations_made_by_other_processes():
    """An API process revokes in the registry only; the orchestrator (before each round) and the
    ingestion workers (every poll) make their presence match the registry's revoked set."""
    p = Presence()
    for dev in ("a", "b", "c"):
        p.update(_status(dev))
    p.set_revoked("c")
    p.sync_revoked({"a"})  # the registry: a revoked (by another process), c re-admitted
    assert sorted(d.device_id for d in p.online()) == ["b", "c"] and p.online_count() == 2
    assert p.revoked == {"a"}
