#!/bin/sh
# Create /opt/koala/venv from the bundled wheels only (no network). Safe to run again: a venv made
# from this bundle (same BUNDLE_ID) is kept; another bundle's is replaced.
# Usage: install-venv.sh [ROOT]   ROOT prefixes every path (a mounted root filesystem); default "".
#
# Small on purpose: requirements.lock is the exact dependency closure (installed --no-deps, so
# packages the agent never imports, such as scipy, stay out), byte code is written only for the
# modules the agent imports, and test suites, NPU plugins and pip itself are removed afterwards
# (python -m device_firmware_py.slim_install lists each with its reason).
set -eu
ROOT="${1:-}"
OPT="$ROOT/opt/koala"
PY="${PYTHON:-python3}"
if [ -x "$OPT/venv/bin/koala-device" ] && [ "$(cat "$OPT/venv/.bundle-id" 2>/dev/null)" = "$(cat "$OPT/BUNDLE_ID")" ]; then
  exit 0
fi
"$PY" -m venv --clear "$OPT/venv"
PIP="$OPT/venv/bin/python -m pip --disable-pip-version-check --quiet"
$PIP install --no-index --no-deps --no-compile --find-links "$OPT/wheels" -r "$OPT/wheels/requirements.lock"
$PIP install --no-index --no-deps --no-compile "$OPT"/wheels/koala_edge_device-*.whl
"$OPT/venv/bin/python" -m device_firmware_py.slim_install "$OPT/venv"
cp "$OPT/BUNDLE_ID" "$OPT/venv/.bundle-id"
