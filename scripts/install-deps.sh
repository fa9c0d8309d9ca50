#!/usr/bin/env bash
# Install the Debian packages p2v drives, idempotently (only what is missing).
set -euo pipefail

PKGS=(
  qemu-system-x86 qemu-utils ovmf
  libguestfs-tools python3-guestfs python3-libnbd python3-hivex libhivex-bin libnbd-bin nbdkit
  linux-image-amd64 supermin
  ntfs-3g dosfstools lvm2 parted cryptsetup-bin mtools xorriso
  debootstrap grub-pc-bin grub-efi-amd64-bin
  openssh-client openssh-server rsync
  python3-venv python3-pip procps iproute2
  virt-v2v
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# supermin (libguestfs appliance) needs a readable kernel in /boot.
if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
  echo "install-deps: no kernel in /boot; install linux-image-amd64" >&2
  exit 1
fi
chmod 0644 /boot/vmlinuz-* 2>/dev/null || true
