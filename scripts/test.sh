#!/usr/bin/env bash
# The README's test command: set up, lint, then the whole pytest suite (slow benchmarks excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,export
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
