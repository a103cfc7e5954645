"""Who a function's instances run as.

As root, the daemon never runs a handler as root. A function runs as its `user:`/`group:`, else
as `defaults.user`/`defaults.group`, else as a user id of its own from the range systemd keeps for
dynamic users (61184-65519), with a group of the same number: two functions then cannot signal,
trace or read each other, and none of them can touch the daemon, its configuration or its log.
Not as root, instances run as the daemon's user and a `user:` that differs is an error.
"""
from __future__ import annotations

import grp
import logging
import os
import pwd
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..config import AppConfig, Defaults, Function
from ..errors import ConfigError, ConfigErrors

log = logging.getLogger("openedge_function.isolation")

DYNAMIC_FIRST, DYNAMIC_LAST = 61184, 65519

# Function name -> its dynamic id, for the daemon's life: a function keeps its id across reloads.
_dynamic: Dict[str, int] = {}

@dataclass(frozen=True)
class RunAs:
    uid: int
    gid: int
    name: str         # for messages: "nobody", "uid 61544 (the function's own)"
    own: bool = False   # a dynamic user of the function's own: what it leaves behind is its alone

    @property
    def switches(self) -> bool:
        """Whether the instance runs as someone other than the daemon."""
        return self.uid != os.geteuid() or self.gid != os.getegid()

    def popen(self) -> Dict[str, Any]:
        """subprocess's arguments that start a child as this user, with no supplementary groups
        (none when that is the daemon's own user)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []} if self.switches else {}

    def __str__(self) -> str:
        return self.name


def current() -> RunAs:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid {uid}"
    return RunAs(uid, os.getegid(), name)


def _uid(text: str) -> "tuple[int, Optional[int], str]":
    """(uid, the user's own group or None, name for messages)."""
    if text.isdigit():
        try:
            entry = pwd.getpwuid(int(text))
            return entry.pw_uid, entry.pw_gid, entry.pw_name
        except KeyError:
            return int(text), None, f"uid {text}"
    entry = pwd.getpwnam(text)
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _gid(text: str) -> int:
    return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid


def group_id(text: str) -> int:
    """A group's id, from its name or number (KeyError when there is no such group)."""
    return _gid(text)


def dynamic_uid(name: str) -> int:
    """An id no account and no other function of this daemon has, the same for `name` each time
    (unless taken)."""
    if name in _dynamic:
        return _dynamic[name]
    span = DYNAMIC_LAST - DYNAMIC_FIRST + 1
    taken = set(_dynamic.values())
    start = zlib.crc32(name.encode("utf-8")) % span
    for step in range(span):
        uid = DYNAMIC_FIRST + (start + step) % span
        if uid in taken:
            continue
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            pass
        _dynamic[name] = uid
        return uid
    raise RuntimeError("no free dynamic user id left")


def run_as(function: Function, defaults: Defaults, file: str = "", index: int = 0) -> RunAs:
    """Who `function`'s instances run as. Raises ConfigError naming the field."""
    user, group = function.user or defaults.user, function.group or defaults.group
    where = f"functions[{index}]" if function.user or function.group else "defaults"
    if os.geteuid() != 0:
        me = current()
        if user is not None and _uid(user)[0] != me.uid or group is not None and _gid(group) != me.gid:
            raise ConfigError(file, f"{where}.{'user' if user is not None else 'group'}",
                              f"running instances as another user needs the daemon to run as root "
                              f"(it runs as {me.name})")
        return me
    if user is None:
        uid = dynamic_uid(function.name)
        gid = _gid(group) if group is not None else uid
        return RunAs(uid, gid, f"uid {uid} (function {function.name}'s own)", own=True)
    uid, own_gid, name = _uid(user)
    if uid == 0:
        log.warning("%s.user: function %s runs as root: its handler can do anything the daemon can",
                    where, function.name)
    gid = _gid(group) if group is not None else (own_gid if own_gid is not None else uid)
    return RunAs(uid, gid, name)



def warn_readable_secrets(config: AppConfig) -> None:
    """A configuration with a password that others can read gets a warning."""
    secrets = bool(config.hub.password) or (config.server is not None and bool(config.server.token)) \
        or any(f.credentials.access_key_secret or f.credentials.token for f in config.functions)
    try:
        mode = os.stat(config.file).st_mode
    except OSError:
        return
    if secrets and mode & 0o004:
        log.warning("%s holds a password or token and every user of this machine can read it: "
                    "chmod o-r %s", config.file, config.file)


def plan(config: AppConfig) -> Dict[str, RunAs]:
    """Who each function runs as. Raises ConfigError naming the field (ConfigErrors: each one)."""
    users, errors = {}, []
    for index, function in enumerate(config.functions):
        try:
            users[function.name] = run_as(function, config.defaults, config.file, index)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) > 1:
        raise ConfigErrors(errors)
    if errors:
        raise errors[0]
    return users
