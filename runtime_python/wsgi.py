"""HTTP functions: a request from the daemon becomes a WSGI environ (PEP 3333), the application
runs as Function Compute runs it (`environ['fc.context']`, `environ['fc.request_uri']`), and its
status, headers and body go back as they are."""
from __future__ import annotations

import io
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

# Headers whose repeats join with "; " rather than ", " (RFC 6265 for Cookie).
_JOIN = {"HTTP_COOKIE": "; "}


def environ(http: Any, body: bytes, context: Any) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "REQUEST_METHOD": http.method,
        "SCRIPT_NAME": http.script_name,
        "PATH_INFO": http.path,
        "QUERY_STRING": http.query,
        "SERVER_NAME": http.server_name,
        "SERVER_PORT": http.server_port,
        "SERVER_PROTOCOL": http.protocol or "HTTP/1.1",
        "REMOTE_ADDR": http.remote_addr,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": http.scheme or "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "fc.context": context,
        "fc.request_uri": http.request_uri,
    }
    for header in http.headers:
        key = header.name.upper().replace("-", "_")
        if key == "CONTENT_LENGTH":
            continue
        if key != "CONTENT_TYPE":
            key = "HTTP_" + key
        if key in env:
            env[key] += _JOIN.get(key, ",") + header.value
        else:
            env[key] = header.value
    return env


def call(app: Callable, http: Any, body: bytes, context: Any) -> Tuple[str, List[Tuple[str, str]], bytes]:
    """Run the application on one request: (status, headers, body). Exceptions propagate."""
    started: Dict[str, Any] = {}
    written: List[bytes] = []

    def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Optional[Any] = None) -> Callable:
        if exc_info is not None:
            try:
                if started.get("sent"):
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif "status" in started:
            raise AssertionError("start_response was called twice without exc_info")
        started["status"], started["headers"] = status, list(headers)
        return written.append   # the legacy write() callable

    result = app(environ(http, body, context), start_response)
    try:
        for chunk in result:
            if chunk:
                started["sent"] = True
                written.append(bytes(chunk))
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if "status" not in started:
        raise RuntimeError("the WSGI application returned without calling start_response")
    return started["status"], started["headers"], b"".join(written)
