"""The in-flight journal: which QoS 1 messages were in flight when the daemon died.

A message that brings the daemon down (an operator's bug, an OOM kill of the supervisor) comes
back from the broker's persistent session at every restart and would bring it down again, for ever.
So each QoS 1 message holds a slot in a memory-mapped file while it is in flight: a 16-byte digest
of its rule, topic and payload, written with a store to memory, no system call (the page cache
keeps what a killed process wrote). At start-up the daemon reads what a crash left in the file;
a message that was in flight at each of the last `CRASHES` crashes in a row is answered with a
`PoisonMessage` envelope instead of being run again. A clean stop ends the row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import time
from typing import List, Set

from .config import state_directory

log = logging.getLogger(__name__)

CRASHES = 3             # crashes in a row that a message must have been in flight at
SLOTS = 4096            # messages in flight tracked at once (more go untracked)
_DIGEST = 16
_MAGIC = b"OEFJ1\n"
_HEADER = 16            # magic, then one byte: 1 while a daemon runs, 0 after a clean stop
_RUNNING = len(_MAGIC)
_EMPTY = bytes(_DIGEST)


def key(rule: str, topic: str, payload: bytes) -> bytes:
    """What identifies a message across deliveries: its rule, topic and payload."""
    hasher = hashlib.blake2b(f"{rule}\0{topic}\0".encode("utf-8"), digest_size=_DIGEST)
    hasher.update(payload)
    digest = hasher.digest()
    return digest if digest != _EMPTY else b"\1" + digest[1:]


class Journal:
    def __init__(self, path: str, crashes: int = CRASHES) -> None:
        self.path = path
        size = _HEADER + SLOTS * _DIGEST
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        history = self._history(crashed=self._map[:len(_MAGIC)] == _MAGIC and self._map[_RUNNING] == 1)
        self.poison: Set[bytes] = set()
        if len(history) >= crashes:
            rows = [set(bytes.fromhex(k) for k in row) for row in history[-crashes:]]
            self.poison = set.intersection(*rows)
        if self.poison:
            log.error("%d message(s) were in flight at each of the last %d crashes: they will be answered "
                      "with PoisonMessage instead of run", len(self.poison), crashes)
        self._map[_HEADER:] = bytes(SLOTS * _DIGEST)
        self._map[:len(_MAGIC)] = _MAGIC
        self._map[_RUNNING] = 1
        self._free: List[int] = list(range(SLOTS - 1, -1, -1))

    def _history(self, crashed: bool) -> List[List[str]]:
        """The in-flight sets of the crashes in a row so far, this one's last (empty after a clean stop)."""
        history_path = self.path + ".crashes"
        history: List[List[str]] = []
        if crashed:
            history = _read_history(history_path)
            view = self._map
            left = [view[offset:offset + _DIGEST].hex() for offset in range(_HEADER, len(view), _DIGEST)
                    if view[offset:offset + _DIGEST] != _EMPTY]
            history = (history + [left])[-CRASHES * 2:]
            log.warning("the daemon did not stop cleanly last time; %d message(s) were in flight",
                        len(left))
        tmp = history_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(history, fh)
        try:
            os.replace(tmp, history_path)
        except OSError:   # a directory in its place, say
            _move_aside(history_path, "it cannot be replaced")
            os.replace(tmp, history_path)
        return history

    def poisoned(self, digest: bytes) -> bool:
        """Whether the message was in flight at each of the last crashes (then it is forgiven:
        answered once, a later copy runs)."""
        if digest in self.poison:
            self.poison.discard(digest)
            return True
        return False

    def add(self, digest: bytes) -> int:
        """Note a message in flight; its slot (-1 when every slot is taken)."""
        if not self._free:
            return -1
        slot = self._free.pop()
        offset = _HEADER + slot * _DIGEST
        self._map[offset:offset + _DIGEST] = digest
        return slot

    def remove(self, slot: int) -> None:
        offset = _HEADER + slot * _DIGEST
        self._map[offset:offset + _DIGEST] = _EMPTY
        self._free.append(slot)

    def close(self) -> None:
        """A clean stop: the next start finds no crash."""
        self._map[_RUNNING] = 0
        self._map.flush()
        self._map.close()


def _read_history(path: str) -> List[List[str]]:
    """What `path` says of the crashes in a row: a list of lists of digests. A file that holds
    anything else is moved aside (the log says where), and the row starts again."""
    try:
        with open(path, "rb") as fh:
            history = json.load(fh)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        _move_aside(path, f"it cannot be read as JSON ({exc})")
        return []
    if not (isinstance(history, list) and all(
            isinstance(row, list) and all(isinstance(k, str) and len(k) == 2 * _DIGEST and _is_hex(k)
                                          for k in row) for row in history)):
        _move_aside(path, "it does not hold lists of message digests")
        return []
    return history


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _move_aside(path: str, why: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = next(name for name in (f"{path}.bad-{stamp}" + (f".{n}" if n else "") for n in range(1000))
                 if not os.path.lexists(name))
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.warning("the in-flight journal's history %s is unusable: %s, and it cannot be moved "
                    "aside (%s); the count of crashes in a row starts again", path, why, exc)
        return
    log.warning("the in-flight journal's history %s is unusable: %s; moved aside to %s, the count of "
                "crashes in a row starts again", path, why, aside)


def journal_path(workdir: str) -> str:
    """In the state directory (config.state_directory)."""
    return os.path.join(state_directory(workdir), ".openedge-function.inflight")


__all__ = ["Journal", "key", "journal_path", "CRASHES"]
