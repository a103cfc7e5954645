"""The daemon's log: a rotated file and/or stderr, as text or JSON lines.

Under a service manager, stderr is the log (with a `path`, the file too). Under systemd, stderr
goes to the journal: each line then starts with its syslog priority
(`<3>` for an error, ...), which journald takes as the entry's level (`journalctl -p warning`),
and carries no time of its own, since the journal keeps one.
"""
from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
from typing import List

from .config import LoggerConfig


# What a record may carry for a JSON line's own fields (`extra=` at the call): the rule, the
# function, the instance and the request it is about.
FIELDS = ("rule", "function", "instance", "request_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: an ISO 8601 time with its zone, the level, the logger, the
    message, and the rule, function, instance and request id as fields where the line has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(
                     timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for field in FIELDS:
            value = record.__dict__.get(field)
            if value:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# Python's levels as syslog priorities, which journald reads from a line's `<N>` prefix.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """Text lines for journald: `<priority>logger: message`, one entry per record."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        # A multi-line record (a traceback) stays one entry: journald splits at newlines.
        return f"<{priority}>" + super().format(record).replace("\n", "\n    ")


def under_service_manager() -> bool:
    """Whether a service manager started the daemon and keeps its stderr as its log (systemd sets
    INVOCATION_ID for a service and JOURNAL_STREAM for its journal)."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def to_journal() -> bool:
    """Whether stderr is systemd's journal stream (systemd sets JOURNAL_STREAM to its device and inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup_logging(config: LoggerConfig) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(getattr(logging, config.level.upper()))
    if config.format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: List[logging.Handler] = []
    if config.path:
        os.makedirs(os.path.dirname(config.path) or ".", exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            config.path, maxBytes=config.size_max_mb << 20, backupCount=config.backup_max,
            encoding="utf-8"))
    console = config.console if config.console is not None else (not config.path or under_service_manager())
    if console or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    journal = config.format == "text" and to_journal()
    for handler in handlers:
        stderr = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        handler.setFormatter(JournalFormatter() if journal and stderr else formatter)
        root.addHandler(handler)
    # The summary logger is checked before each line is built: off, it costs nothing per message.
    logging.getLogger("openedge_function.summary").setLevel(logging.NOTSET if config.summary else logging.WARNING)
