"""Converters: each takes a YAML value and returns the typed one, or raises ValueError saying why.

Depends on nothing else in the daemon.
"""
from __future__ import annotations

import re
from typing import Any, Callable, List, Optional, Tuple

# MQTT's own bound on a packet: a fixed header of 5 bytes and 268,435,455 more.
PACKET_MAX = 268435455 + 5
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
# The smallest hub.maxsize: below it, an error envelope (without the input) may not fit either.
_MAXSIZE_MIN = 1024
# Below this a Python instance cannot start.
_MEMORY_MIN = 8 << 20

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def show(value: Any) -> str:
    """A value as an error message names it: its YAML type and its text."""
    return f"{type(value).__name__} {value!r}"


def duration(value: Any) -> float:
    """`300ms`, `30s`, `10m`, `1h`, `1m30s` (Go's notation) or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration (use 300ms, 30s, 10m, 1h)")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"{value!r} is not a duration (use 300ms, 30s, 10m, 1h)")
    return total


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def byte_size(value: Any) -> int:
    """`512k`, `4m`, `1g` (also `4MB`, `4MiB`; binary multiples) or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size (use 512k, 4m, 1g or bytes)")
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (use 512k, 4m, 1g or bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def above_zero(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`convert`, refusing 0."""
    def check(value: Any) -> Any:
        converted = convert(value)
        if converted <= 0:
            raise ValueError("must be above 0")
        return converted
    return check


def bounded_int(low: Optional[int], high: Optional[int]) -> Callable[[Any], int]:
    """An integer within [low, high]."""
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        if low is not None and value < low:
            raise ValueError(f"{value} is below the lower bound {low}")
        if high is not None and value > high:
            raise ValueError(f"{value} is above the upper bound {high}")
        return value
    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def string(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{value!r} is not a string")
    return str(value)


def nonempty_string(value: Any) -> str:
    text = string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def one_of(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = string(value).lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text
    return convert


def log_level(value: Any) -> str:
    level = one_of("debug", "info", "warn", "warning", "error")(value)
    return "warning" if level == "warn" else level


_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,140}$")
_HANDLER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def function_name(value: Any) -> str:
    text = string(value)
    if not _NAME.match(text):
        raise ValueError(f"{text!r} does not match ^[a-zA-Z0-9_-]{{1,140}}$")
    return text


def entry_point(value: Any) -> str:
    """`module.function` (the module may be dotted: `pkg.mod.function`)."""
    text = string(value)
    if not _HANDLER.match(text):
        raise ValueError(f"{text!r} is not of the form module.function")
    return text


def topic_filter(value: Any) -> str:
    """A subscription: wildcards allowed where MQTT allows them, `$share/group/...` too."""
    text = nonempty_string(value)
    levels = text.split("/")
    if text.startswith("$share/"):
        if len(levels) < 3 or not levels[1] or any(c in levels[1] for c in "+#"):
            raise ValueError(f"{text!r} is not a valid shared subscription ($share/group/topic)")
        levels = levels[2:]
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{text!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"{text!r}: '+' must be a whole level")
    return text


def response_filters(value: Any) -> Tuple[str, ...]:
    """rule.response.topics: the filters a response topic must match (a list, or one filter)."""
    items = value if isinstance(value, list) else [value]
    found = []
    for item in items:
        text = topic_filter(item)
        if text.startswith("$share/"):
            raise ValueError(f"{text!r}: a shared subscription is not a topic filter for answers")
        found.append(text)
    if not found:
        raise ValueError("expected at least one topic filter")
    return tuple(found)


def topic_name(value: Any) -> str:
    """A publish topic: no wildcards."""
    text = nonempty_string(value)
    if "+" in text or "#" in text:
        raise ValueError(f"{text!r}: a publish topic cannot hold wildcards")
    return text


qos = bounded_int(0, 1)


def packet_size(value: Any) -> int:
    """hub.maxsize: between 1k and MQTT's own bound."""
    size = byte_size(value)
    if not _MAXSIZE_MIN <= size <= PACKET_MAX:
        raise ValueError(f"{value!r} is not between 1k and 256m (MQTT's own limit)")
    return size


PROTOCOL_AUTO = 0   # MQTT 5, and 3.1.1 with a broker that refuses it


def protocol(value: Any) -> int:
    """MQTT's protocol level: 4 for 3.1.1, 5 for 5, PROTOCOL_AUTO for auto."""
    text = string(value).strip().lower().lstrip("v")
    if text in ("3.1.1", "311", "4"):
        return 4
    if text in ("5", "5.0"):
        return 5
    if text == "auto":
        return PROTOCOL_AUTO
    raise ValueError(f"{value!r} is not 3.1.1, 5 or auto")


def session_expiry(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() in ("never", "forever"):
        return SESSION_NEVER_EXPIRES
    return min(int(duration(value)), SESSION_NEVER_EXPIRES)


def memory_limit(value: Any) -> int:
    """An instance's memory: a size, 0 for none, at least what a Python instance needs."""
    size = byte_size(value)
    if 0 < size < _MEMORY_MIN:
        raise ValueError(f"{value!r} is below the 8m a Python instance needs")
    return size


def positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{value!r} is not a number above 0")
    return float(value)


def cpu_list(value: Any) -> Tuple[int, ...]:
    """`0-1,3` → (0, 1, 3)."""
    cpus: List[int] = []
    for part in string(value).split(","):
        part = part.strip()
        bounds = part.split("-")
        if not part or len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise ValueError(f"{value!r} is not a CPU list such as 0-1,3")
        cpus.extend(range(int(bounds[0]), int(bounds[-1]) + 1))
    return tuple(sorted(set(cpus)))


def account(kind: str) -> Callable[[Any], str]:
    """A user or group: a name that exists on this machine, or a numeric id."""
    def convert(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise ValueError(f"expected a {kind} name or a numeric id, got {show(value)}")
        text = str(value)
        if text.isdigit():
            return text
        import grp
        import pwd
        try:
            (pwd.getpwnam if kind == "user" else grp.getgrnam)(text)
        except KeyError:
            raise ValueError(f"no {kind} named {text!r} on this machine"
                             + (" (make one with: useradd --system --no-create-home "
                                f"--shell /usr/sbin/nologin {text})" if kind == "user" else "")) from None
        return text
    return convert
