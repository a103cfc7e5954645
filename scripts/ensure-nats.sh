#!/usr/bin/env bash
# Makes sure nats-server is installed (the tests start their own clusters of it on loopback
# ports); installs Debian's package with apt-get when it is missing.
set -euo pipefail
if command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ]; then
    exit 0
fi
echo "installing nats-server with apt-get" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nats-server >/dev/null
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || { echo "nats-server could not be installed" >&2; exit 1; }
