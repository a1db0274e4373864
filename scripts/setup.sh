#!/usr/bin/env bash
# Idempotent setup for a fresh Debian machine: system packages (when root), a venv, the project.
# Usage: scripts/setup.sh [EXTRAS]   (default: dev,export). Re-running is cheap: a stamp file
# keyed on pyproject.toml skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev,export}"
PY="${PYTHON:-python3}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  need=()
  [ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
  command -v mosquitto >/dev/null || need+=(mosquitto mosquitto-clients)
  if [[ "$EXTRAS" == *dev* ]]; then
    command -v chromium >/dev/null || need+=(chromium)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${need[*]}"
    (apt-get install -y -q "${need[@]}" >/dev/null 2>&1) || {
      apt-get update -q >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
    }
  fi
  # optional: the Compose v1 client validates docker-compose.yml (`config`) without a Docker engine
  if [[ "$EXTRAS" == *dev* ]] && ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null 2>&1 \
      || echo "[setup] note: docker-compose not installable; the compose validation test will skip"
  fi
  # optional: sshd for the test of `flash.sh --host` (a private sshd on a loopback port). Installed
  # with service start-up denied (policy-rc.d) so no system sshd comes up listening on port 22.
  if [[ "$EXTRAS" == *dev* ]] && [ ! -x /usr/sbin/sshd ]; then
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null 2>&1 \
      || echo "[setup] note: openssh-server not installable; flash.sh --host will not be tested"
    [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  fi
else
  [ -d /usr/share/datasets/fashion-mnist ] || echo "[setup] note: not root; install dataset-fashion-mnist yourself for Fashion-MNIST (digits works without it)"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.koala-setup-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[setup] pip install -e .[$EXTRAS] (torch CPU wheel pinned: torch==2.13.0)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e ".[$EXTRAS]"
  rm -f .venv/.koala-setup-*
  touch "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python --version), venv .venv"
