#!/usr/bin/env bash
# A Debian 12 gateway for the VM tests: systemd as PID 1, the unified cgroup v2 hierarchy,
# mosquitto, Python. Built once with mmdebstrap from Debian's archive and kept in a cache outside
# the clone, keyed by what goes into it (this script), so later runs start at the boot.
#
#   build-image.sh CACHE_DIR    prints the directory holding disk.img, vmlinuz and initrd.img
set -euo pipefail
cache=${1:?usage: build-image.sh CACHE_DIR}
here=$(cd "$(dirname "$0")" && pwd)
key=$(cat "$0" "$here/guest/oef-vmtest.service" | sha256sum | cut -c1-16)
out="$cache/bookworm-$key"
if [ -f "$out/disk.img" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
    echo "$out"
    exit 0
fi
for tool in mmdebstrap mkfs.ext4; do
    command -v "$tool" >/dev/null || { echo "build-image.sh: $tool is missing" >&2; exit 3; }
done
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
packages=systemd,systemd-sysv,dbus,udev,kmod,linux-image-amd64,initramfs-tools,python3,mosquitto,mosquitto-clients,procps,iproute2,util-linux
mmdebstrap --variant=minbase --include="$packages" \
    --customize-hook='echo gateway > "$1/etc/hostname"' \
    --customize-hook='printf "/dev/vda / ext4 rw,relatime 0 1\nshare /share 9p trans=virtio,version=9p2000.L,msize=262144,nofail 0 0\n" > "$1/etc/fstab"' \
    --customize-hook='mkdir -p "$1/share"' \
    --customize-hook='printf "9p\n9pnet_virtio\n" >> "$1/etc/modules"' \
    --customize-hook='printf "virtio_pci\nvirtio_blk\n9p\n9pnet_virtio\next4\n" >> "$1/etc/initramfs-tools/modules"' \
    --customize-hook='chroot "$1" update-initramfs -u -k all' \
    --customize-hook='chroot "$1" passwd -d root' \
    --customize-hook='rm -f "$1"/etc/systemd/system/timers.target.wants/*' \
    --customize-hook="copy-in $here/guest/oef-vmtest.service /etc/systemd/system/" \
    --customize-hook='chroot "$1" systemctl enable oef-vmtest.service' \
    --customize-hook='printf "listener 1883 0.0.0.0\nallow_anonymous true\n" > "$1/etc/mosquitto/conf.d/gateway.conf"' \
    --customize-hook='printf "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n" > "$1/etc/systemd/network/80-dhcp.network"' \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
    --customize-hook='cp "$1"/boot/vmlinuz-* "$1/../vmlinuz"; cp "$1"/boot/initrd.img-* "$1/../initrd.img"' \
    bookworm "$work/root" http://deb.debian.org/debian
mkfs.ext4 -q -F -L root -d "$work/root" "$work/disk.img" 3G
mkdir -p "$out"
mv "$work/disk.img" "$work/vmlinuz" "$work/initrd.img" "$out/"
for old in "$cache"/bookworm-*; do   # images of earlier inputs: only the newest is used
    [ "$old" = "$out" ] || rm -rf "$old"
done
echo "$out"
