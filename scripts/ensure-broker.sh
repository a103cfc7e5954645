#!/usr/bin/env bash
# Makes sure mosquitto (and openssl, which the TLS tests use) is installed and, unless
# --binary-only, that a broker answers on 127.0.0.1:1883 (starting one with
# scripts/mosquitto.conf when nothing listens there).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

find_mosquitto() {
    command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true
}

bin=$(find_mosquitto)
if [ -z "$bin" ] || ! command -v mosquitto_pub >/dev/null || ! command -v openssl >/dev/null; then
    echo "installing mosquitto, its clients and openssl with apt-get" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto mosquitto-clients openssl >/dev/null
    bin=$(find_mosquitto)
fi
[ -n "$bin" ] || { echo "mosquitto could not be installed" >&2; exit 1; }
[ "${1:-}" = "--binary-only" ] && exit 0

if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    exit 0
fi
echo "no broker on 127.0.0.1:1883: starting mosquitto" >&2
"$bin" -d -c "$here/mosquitto.conf"
for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && exit 0
    sleep 0.1
done
echo "mosquitto did not start on 127.0.0.1:1883" >&2
exit 1
