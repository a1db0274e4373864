#!/usr/bin/env bash
# Install this KOALA Edge bundle (device @DEVICE_ID@) onto a device.
#
#   ./flash.sh --host pi@10.0.0.7 [--ssh-opt "-o Port=2222 -i key"] [--remote-root /]
#                                            copy over SSH, install (sudo unless root), start the service
#   ./flash.sh --target-root /mnt/sdroot [--install-venv]   write into a mounted root filesystem
#   ./flash.sh --target-root /srv/koala/pi-01 --in-place --install-venv
#                                            a staging root the agent runs from, in place
#
# The bundle is self-contained: the agent and every Python dependency are wheels under
# opt/koala/wheels, so the device never needs network access to install. With --target-root the
# venv is normally created on the device's first boot (the unit's ExecStartPre); --install-venv
# creates it now, which only makes sense when ROOT will run on this CPU architecture (a chroot,
# a container image, a test). Paths in etc/koala/device.json and the unit are fixed here, at
# install: the device's own root by default; with --in-place the target directory itself, so the
# agent runs from there (start it with ROOT/opt/koala/venv/bin/koala-device run --config
# ROOT/etc/koala/device.json). The target root is created if it does not exist. --ssh-opt is given to both ssh and scp, so use -o options (-o Port=N,
# not -p N, which scp reads as "preserve times"). --remote-root installs under another directory
# of the device (a staging root); the service is then not started.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
HOST="" ROOT="" RROOT="/" VENV=0 START=1 INPLACE=0 SSH_OPTS=()

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --host) HOST="$2"; shift 2 ;;
    --target-root) ROOT="$2"; shift 2 ;;
    --remote-root) RROOT="$2"; shift 2 ;;
    --install-venv) VENV=1; shift ;;
    --in-place) INPLACE=1; shift ;;
    --no-start) START=0; shift ;;
    --ssh-opt) read -r -a more <<<"$2"; SSH_OPTS+=("${more[@]}"); shift 2 ;;
    -h|--help) usage ;;
    *) echo "flash.sh: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$HOST" ] || [ -n "$ROOT" ] || usage
[ -z "$HOST" ] || [ -z "$ROOT" ] || { echo "flash.sh: --host and --target-root are exclusive" >&2; exit 2; }

if [ -n "$HOST" ]; then
  remote="/tmp/koala-bundle-@DEVICE_ID@"
  echo "[flash] copying bundle to $HOST:$remote"
  ssh "${SSH_OPTS[@]}" "$HOST" "rm -rf '$remote' && mkdir -p '$remote'"
  scp -q -r "${SSH_OPTS[@]}" "$HERE"/. "$HOST:$remote/"
  start_flag=""; [ "$START" = 1 ] || start_flag="--no-start"
  [ "$RROOT" = "/" ] || start_flag="$start_flag --in-place"
  # root logs in directly on many images (no sudo installed); everyone else goes through sudo
  ssh "${SSH_OPTS[@]}" "$HOST" "if [ \"\$(id -u)\" = 0 ]; then S=''; else S=sudo; fi; \
    \$S bash '$remote/flash.sh' --target-root '$RROOT' --install-venv $start_flag && rm -rf '$remote'"
  exit 0
fi

mkdir -p "$ROOT" || { echo "flash.sh: cannot create target root $ROOT" >&2; exit 2; }
ROOT="$(cd "$ROOT" && pwd)"; [ "$ROOT" = "/" ] && P="" || P="$ROOT"
# what the running device will see as its root: "" (its own /) or, in place, this directory
DEVROOT=""; [ "$INPLACE" = 1 ] && DEVROOT="$P"
case "$DEVROOT" in *'#'*|*'&'*|*'\'*|*'"'*) echo "flash.sh: an --in-place root must not contain # & \\ or \"" >&2; exit 2 ;; esac
echo "[flash] installing device @DEVICE_ID@ into ${ROOT}"
install -d -m 0755 "$P/opt/koala" "$P/etc/koala" "$P/etc/systemd/system"
install -d -m 0700 "$P/var/lib/koala"
cp -R "$HERE/opt/koala/." "$P/opt/koala/"
sed "s#@ROOT@#$DEVROOT#g" "$HERE/etc/koala/device.json" > "$P/etc/koala/device.json"
chmod 0644 "$P/etc/koala/device.json"
install -m 0644 "$HERE/etc/koala/ca.crt" "$P/etc/koala/"
install -m 0600 "$HERE/etc/koala/device.secret" "$P/etc/koala/"
for f in client.crt client.key; do
  if [ -f "$HERE/etc/koala/$f" ]; then install -m 0600 "$HERE/etc/koala/$f" "$P/etc/koala/"; fi
done
if [ -d "$HERE/var/lib/koala" ]; then cp -R "$HERE/var/lib/koala/." "$P/var/lib/koala/"; fi
sed "s#@ROOT@#$DEVROOT#g" "$HERE/etc/systemd/system/koala-device.service" > "$P/etc/systemd/system/koala-device.service"
chmod 0644 "$P/etc/systemd/system/koala-device.service"
if [ "$VENV" = 1 ]; then
  echo "[flash] creating venv offline from bundled wheels"
  sh "$P/opt/koala/install-venv.sh" "$P"
fi
if [ -z "$P" ] && command -v systemctl >/dev/null && [ "$START" = 1 ]; then
  systemctl daemon-reload
  systemctl enable --now koala-device.service
  echo "[flash] koala-device.service enabled and started"
fi
echo "[flash] done"
