"""Event decoding and result encoding, as OpenEdge's runtime did it."""
from __future__ import annotations

import json
from typing import Any, Tuple

# Result kinds, the values of InvokeResponse.Kind.
NONE, BYTES, JSON = 0, 1, 2


def decode_event(payload: bytes) -> Any:
    """The payload JSON-decoded when it is valid JSON, else the raw bytes; empty → {}.

    Whatever a publisher sends decodes to one or the other: invalid UTF-8, a number past the
    interpreter's digit limit (ValueError) and nesting deeper than the recursion limit
    (RecursionError, raised by the C scanner before the stack runs out) all give the bytes.
    """
    if not payload:
        return {}
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):   # ValueError: JSONDecodeError and UnicodeDecodeError too
        return payload


def encode_result(result: Any) -> Tuple[int, bytes]:
    """(kind, payload): None → nothing, bytes as they are, anything else JSON (UTF-8, non-ASCII kept).

    Raises TypeError, ValueError (a lone surrogate, say) or RecursionError (nested too deep) when
    the value cannot be JSON-encoded.
    """
    if result is None:
        return NONE, b""
    if isinstance(result, bytes):
        return BYTES, result
    if isinstance(result, (bytearray, memoryview)):
        return BYTES, bytes(result)
    return JSON, json.dumps(result, ensure_ascii=False).encode("utf-8")
