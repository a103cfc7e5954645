"""The daemon's log: a rotated file and/or stderr, as text or JSON lines."""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from typing import List

from .config import LoggerConfig


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


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
    if config.console or not handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # The summary logger is checked before each line is built: off, it costs nothing per message.
    logging.getLogger("openedge_function.summary").setLevel(logging.NOTSET if config.summary else logging.WARNING)
