#!/usr/bin/env bash
# Makes sure Debian's chromium is installed: tests/test_console.py drives the console in it,
# headless (through Playwright, from the test extra). Installs the package with apt-get when it
# is missing.
set -euo pipefail
if command -v chromium >/dev/null || [ -x /usr/bin/chromium ]; then
    exit 0
fi
echo "installing chromium with apt-get" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || { echo "chromium could not be installed" >&2; exit 1; }
