#!/usr/bin/env bash
# make deb: the Debian package, built from this checkout (its working tree) into dist/.
# Installs the build tools from Debian's archive when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
missing=()
for pair in dpkg-buildpackage:dpkg-dev dh:debhelper dh_virtualenv:dh-virtualenv; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
/usr/bin/python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "build-deb: installing ${missing[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# The working tree as it is, without what builds and runs leave in it.
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -cf - . | (mkdir "$build/src" && tar -C "$build/src" -xf -)
(cd "$build/src" && dpkg-buildpackage -us -uc -b >"$build/build.log" 2>&1) || {
    tail -40 "$build/build.log" >&2
    exit 1
}
mkdir -p dist
mv "$build"/*.deb dist/
ls dist/*.deb
