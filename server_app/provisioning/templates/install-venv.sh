#!/bin/sh
# Create /opt/koala/venv from the bundled wheels only (no network). Safe to run again.
# Usage: install-venv.sh [ROOT]   ROOT prefixes every path (a mounted root filesystem); default "".
set -eu
ROOT="${1:-}"
OPT="$ROOT/opt/koala"
PY="${PYTHON:-python3}"
if [ -x "$OPT/venv/bin/koala-device" ] && [ "$(cat "$OPT/venv/.bundle-id" 2>/dev/null)" = "$(cat "$OPT/BUNDLE_ID")" ]; then
  exit 0
fi
"$PY" -m venv "$OPT/venv"
"$OPT/venv/bin/pip" install --quiet --no-index --find-links "$OPT/wheels" -r "$OPT/wheels/requirements.lock"
"$OPT/venv/bin/pip" install --quiet --no-index --no-deps "$OPT"/wheels/koala_edge-*.whl
cp "$OPT/BUNDLE_ID" "$OPT/venv/.bundle-id"
