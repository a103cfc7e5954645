#!/usr/bin/env bash
# Prints the interpreter `make install` builds the venv from.
#
# As root, the daemon runs instances as unprivileged users, and they run the venv's interpreter:
# one that lives under a private home (pyenv's in /root, say) cannot even start for them. So as
# root the first python3 that an unprivileged user can run wins; otherwise python3 on PATH.
set -u
if [ "$(id -u)" != 0 ] || ! command -v setpriv >/dev/null; then
    command -v python3
    exit
fi
for candidate in python3 /usr/bin/python3 /usr/local/bin/python3; do
    path=$(command -v "$candidate") || continue
    if setpriv --reuid=65534 --regid=65534 --clear-groups "$path" -c 'import json, venv' \
            >/dev/null 2>&1; then
        echo "$path"
        exit
    fi
done
echo "pick-python: no python3 that an unprivileged user can run; instances will fail to start" >&2
command -v python3
