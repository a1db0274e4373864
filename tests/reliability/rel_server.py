"""The KOALA server as its own OS process, for faults that need a real process (SIGKILL, restart).

Usage: python tests/reliability/rel_server.py OPTIONS.json
OPTIONS.json holds `server_app.services.ServerOptions` fields. The process builds the real
`ServerServices` (registry migrations, MQTT link with Last Will, ingestion, MqttFleet,
RoundOrchestrator thread) — nothing is simulated — prints `READY` once started and stops cleanly on
SIGTERM. SIGKILL is the point: it gets no chance to clean up, and a second process started on the
same database and data directory must resume from what the first one committed.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path


def main(path: str) -> int:
    from server_app.services import ServerOptions, ServerServices

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")  # fmt: skip
    opts = ServerOptions(**json.loads(Path(path).read_text()))
    services = ServerServices(opts)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    services.start()
    print("READY", flush=True)
    done.wait()
    services.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
