#!/usr/bin/env bash
# Installs everything vmprune and its lab need on Debian 12 (run as root). Idempotent: a second run only
# checks. Debian packages via apt, npm packages from the lockfile, then the lab (guest kernels 6.1 and 6.12,
# initramfs, data disk, the Debian guest with PostgreSQL, QEMU 10.0 beside the system's 7.2), cached under .cache/lab.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  qemu-system-x86  # QEMU 7.2 (Debian 12)
  qemu-utils       # qemu-img (qcow2 overlays), qemu-nbd and qemu-io (NBD exports of shared disks)
  busybox-static   # guest userland
  cpio kmod xz-utils zstd  # initramfs: archive, depmod, compressed modules
  e2fsprogs        # mkfs.ext4 -d for the data disk
  gcc libc6-dev    # static guest programs
  util-linux       # setpriv --pdeathsig
  iproute2 socat   # network namespaces and links for tests
  mmdebstrap       # the Debian guest's system disk (src/lab/debian-guest.ts)
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients  # libvirt lab: libvirtd + virsh (no system units)
  chromium fonts-dejavu-core  # headless screenshots of the HTML report (test/support/report-screenshot.ts)
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

node -e 'const [a,b]=process.versions.node.split(".").map(Number); if (a<20||(a===20&&b<19)) { console.error(`setup: Node ${process.versions.node} is too old: vmprune needs Node >= 20.19`); process.exit(1) }'

if [[ ! -f node_modules/.package-lock.json ]] || ! cmp -s <(node -e 'console.log(JSON.stringify(require("./package-lock.json").packages))') <(node -e 'console.log(JSON.stringify(require("./node_modules/.package-lock.json").packages))' 2>/dev/null); then
  echo "setup: npm ci" >&2
  npm ci --no-audit --no-fund >&2
fi
npm run --silent build >&2
node dist/cli/main.js lab build --debian-guest
