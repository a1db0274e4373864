"""Malformed progress messages are counted and logged (rate-limited), never raise, never recorded
per message in the registry."""

from __future__ import annotations

import logging

from device_firmware_py.contract import topics


def test_malformed_progress_is_counted_and_logged_not_raised(caplog):
    from server_app.ingest import Ingestor

    ing = Ingestor.__new__(Ingestor)  # only on_progress's state is needed
    from collections import Counter

    from server_app.ingest import Presence

    ing.counts = Counter()
    ing.presence = Presence()
    topic = topics.device_progress("dev001")
    with caplog.at_level(logging.WARNING, logger="koala.ingest"):
        outs = [ing.on_progress(topic, b"\x00not json") for _ in range(5)]
    assert all(o.status == "ignored" and o.reason for o in outs)
    key = next(k for k in ing.counts if k.startswith("progress_dropped:"))
    assert ing.counts[key] == 5
    assert len([r for r in caplog.records if "progress dropped" in r.message]) == 3  # 1st, 2nd, 4th
    assert ing.presence.progress == {}
