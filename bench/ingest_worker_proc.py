"""One ingestion worker for `koala bench ingestion`: the real `ServerServices` in role `ingest` (what
`koala serve --role ingest` runs, without the HTTP port), as its own process.

Usage: python -m bench.ingest_worker_proc DB_URL DATA_DIR BROKER_PORT
Prints READY once subscribed; on a line `bye` or EOF stops cleanly (draining what it holds) and
prints its Ingestor's outcome counts as one JSON line.
"""

from __future__ import annotations

import json
import logging
import sys


def main(db_url: str, data_dir: str, port: str) -> int:
    from server_app.services import ServerOptions, ServerServices

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    opts = ServerOptions(db_url=db_url, data_dir=data_dir, proxy_path="", test_path="", broker_port=int(port),
                         shared_subscriptions=True, role="ingest")  # fmt: skip
    services = ServerServices(opts)
    services.start()
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "bye":
            break
    counts = services.ingestor.counts
    services.stop()
    print(json.dumps(dict(counts)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
