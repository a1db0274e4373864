#!/usr/bin/env bash
# The README's main-job command: set up, then run the embedded demo (broker + SQLite + server + devices).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh server
exec .venv/bin/koala demo "$@"
