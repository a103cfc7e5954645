#!/usr/bin/env bash
# What the VM tests need from Debian's archive: QEMU, mmdebstrap and e2fsprogs for the guest, and
# the tools `make deb` builds the package with. Installed with apt-get when missing; a machine
# where that fails runs the other tests and skips these, saying why.
set -uo pipefail
need=()
for pair in qemu-system-x86_64:qemu-system-x86 mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs \
            dpkg-buildpackage:dpkg-dev dh:debhelper dh_virtualenv:dh-virtualenv; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
/usr/bin/python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "ensure-tools: missing ${need[*]}; the VM tests will be skipped" >&2
    exit 0
fi
echo "ensure-tools: installing ${need[*]}" >&2
apt-get update -qq >/dev/null 2>&1
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || echo "ensure-tools: could not install ${need[*]}; the VM tests will be skipped" >&2
exit 0
