#!/usr/bin/env bash
# Make (once) a Debian bookworm arm64 root that runs under qemu-user on an x86-64 host, for the
# arm64 device checks (docs/arm64.md, tests/e2e/test_arm64_round.py). Root only. Idempotent: a root
# that already has python3 is reused. Usage: scripts/arm64_root.sh [ROOT]   (default /var/tmp/arm64root)
set -euo pipefail
R=${1:-/var/tmp/arm64root}
log() { echo "[arm64-root] $*" >&2; }
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi
if [ ! -x "$R/usr/bin/python3" ] || [ ! -e "$R/.koala-root-ready" ]; then
  log "debootstrap bookworm arm64 -> $R (first stage)"
  mkdir -p "$R"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv \
    bookworm "$R" http://deb.debian.org/debian >/dev/null
  log "second stage under qemu-user (4-7 min on 2 cores)"
  chroot "$R" /debootstrap/debootstrap --second-stage >/dev/null
  touch "$R/.koala-root-ready"
fi
# an ARM /proc/cpuinfo (qemu-user shows the host's x86 one, which crashes XNNPACK's cpuinfo): 2 x Cortex-A72
printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' 0 1 > "$R/../cpuinfo-a72"
mountpoint -q "$R/proc" || mount -t proc proc "$R/proc"
mountpoint -q "$R/sys" || mount -t sysfs sysfs "$R/sys"
mountpoint -q "$R/dev" || mount --bind /dev "$R/dev"
mountpoint -q "$R/proc/cpuinfo" || mount --bind "$R/../cpuinfo-a72" "$R/proc/cpuinfo"
cp /etc/resolv.conf "$R/etc/" 2>/dev/null || true
log "ready: $R ($(chroot "$R" python3 --version 2>&1), $(chroot "$R" uname -m))"
echo "$R"
