"""The client for the daemon's invoke API (`POST /invoke/<function>`), in the shape of Tencent SCF's
SDK: `Client(...).invoke('FuncInvoked', data={...})`, `client.FuncInvoked(data=...)`, and
`InvokeError` with `code`, `message`, `request_id`, `response`, `stack_trace` and their getters.

Standard library only, so it runs inside any instance; `openedge_function.sdk` is the same module
under the daemon's name. Inside a function, `Client()` needs no arguments and no server: its calls
travel over the instance's own channel to the supervisor (runtime_python.channel).
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from typing import Any, Dict, Optional, Sequence
from urllib.parse import quote, urlencode

from runtime_python import channel

ADDRESS_ENV = "OPENEDGE_FUNCTION_ADDRESS"
TOKEN_ENV = "OPENEDGE_FUNCTION_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:8080"
REQUEST_ID_HEADER = "X-Request-Id"
CHAIN_HEADER = "X-OpenEdge-Call-Chain"        # the functions waiting on this call, outermost first
DEADLINE_HEADER = "X-OpenEdge-Timeout-Ms"     # how long the caller can still wait


class InvokeError(Exception):
    """A call that did not return a result: the function failed, or the call could not be made.
    `code` is the error type (`FunctionTimeout`, `UnknownFunction`, ...), `status` the HTTP status
    (0 when there was no answer), `response` the decoded error envelope."""

    def __init__(self, code: str, message: str, request_id: str = "", response: Any = None,
                 stack_trace: Optional[Sequence[str]] = None, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.response = response
        self.stack_trace = list(stack_trace or [])
        self.status = status

    def get_code(self) -> str:
        return self.code

    def get_message(self) -> str:
        return self.message

    def get_request_id(self) -> str:
        return self.request_id

    def get_response(self) -> Any:
        return self.response

    def get_stack_trace(self) -> list:
        return self.stack_trace

    def __str__(self) -> str:
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"[{self.code}] {self.message}{rid}"


# SCF's name for it, so handlers that catch it run unchanged.
TencentServerlessSDKException = InvokeError


class Client:
    """Calls functions through the daemon's HTTP server over one keep-alive connection per thread.

    `region`, `secret_id` and `secret_key` are accepted for SCF compatibility and ignored: the
    daemon authenticates with its own token (`server.token`)."""

    def __init__(self, address: Optional[str] = None, token: Optional[str] = None,
                 timeout: Optional[float] = None, region: Optional[str] = None,
                 secret_id: Optional[str] = None, secret_key: Optional[str] = None) -> None:
        # Inside a function, with no address of its own, calls go over the instance's channel.
        self._in_daemon = address is None and token is None and not os.environ.get(ADDRESS_ENV)
        address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
        if "://" in address:   # http://host:port; unix:/path is a Unix socket (the control socket)
            address = address.split("://", 1)[1]
        self.address = address.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.timeout = timeout
        self._local = threading.local()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda data=None, qualifier=None, namespace=None: self.invoke(
            name, data=data, qualifier=qualifier, namespace=namespace)

    def invoke(self, function_name: str, data: Any = None, qualifier: Optional[str] = None,
               namespace: Optional[str] = None, _chain: Sequence[str] = (),
               _timeout: Optional[float] = None) -> Any:
        """Run `function_name` on `data` and return its result: JSON decoded, bytes as they are,
        None when it returned None. Raises InvokeError when it fails."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            body, content_type = bytes(data), "application/octet-stream"
        else:
            body, content_type = json.dumps(data).encode("utf-8"), "application/json"
        query = {key: value for key, value in (("qualifier", qualifier), ("namespace", namespace))
                 if value}
        path = "/invoke/" + quote(function_name, safe="")
        if query:
            path += "?" + urlencode(query)
        headers = {"Content-Type": content_type, "Accept": "application/json, application/octet-stream"}
        if _chain:
            headers[CHAIN_HEADER] = ",".join(_chain)
        timeout = _timeout if _timeout is not None else self.timeout
        if _timeout is not None:
            headers[DEADLINE_HEADER] = str(max(1, int(_timeout * 1000)))
        link = channel.current() if self._in_daemon else None
        if link is not None:
            try:
                status, reply_headers, payload = link.call(function_name, body, headers, query, timeout)
            except TimeoutError:
                raise InvokeError("InvokeTimeout", f"no answer from the daemon within {timeout:g}s "
                                  f"calling {function_name}") from None
            except ConnectionError as exc:
                raise InvokeError("ConnectionError", f"cannot reach the daemon: {exc}") from None
            except ChildProcessError as exc:
                raise InvokeError("NotTheInstance", str(exc)) from None
            except channel.CallTooLarge as exc:
                raise InvokeError("MessageTooLarge", str(exc)) from None
        else:
            status, reply_headers, payload = self._request("POST", path, body, headers, timeout)
        if status == 204:
            return None
        if 200 <= status < 300:
            if reply_headers.get("content-type", "").startswith("application/json"):
                return json.loads(payload)
            return payload
        raise _error(status, reply_headers, payload)

    def status(self, timeout: Optional[float] = 10.0) -> Dict[str, Any]:
        """The daemon's functions, instances and counters (`GET /status`)."""
        status, reply_headers, payload = self._request("GET", "/status", b"", {}, timeout)
        if status != 200:
            raise _error(status, reply_headers, payload)
        return json.loads(payload)

    def _request(self, method: str, path: str, body: bytes, headers: Dict[str, str],
                 timeout: Optional[float]) -> "tuple[int, Dict[str, str], bytes]":
        """One request over this thread's kept-alive connection, with the token; one reconnect if
        the server closed the connection meanwhile."""
        if self.token:
            headers = {**headers, "Authorization": f"Bearer {self.token}"}
        for attempt in (0, 1):
            connection = getattr(self._local, "connection", None)
            fresh = connection is None
            if fresh:
                connection = (_UnixConnection(self.address[5:], timeout) if self.address.startswith("unix:")
                              else http.client.HTTPConnection(self.address, timeout=timeout))
                self._local.connection = connection
            else:
                connection.timeout = timeout
                if connection.sock is not None:
                    connection.sock.settimeout(timeout)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                reply = {key.lower(): value for key, value in response.getheaders()}
                if response.will_close:
                    self.close()
                return response.status, reply, payload
            except socket.timeout:
                self.close()
                raise InvokeError("InvokeTimeout", f"no answer from {self.address} within {timeout:g}s "
                                  f"calling {path}") from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                # A kept-alive connection the server closed meanwhile: try once on a new one.
                if fresh or attempt:
                    raise InvokeError("ConnectionError", f"cannot reach the daemon at {self.address}: "
                                      f"{exc}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: the daemon's control socket."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _error(status: int, headers: Dict[str, str], payload: bytes) -> InvokeError:
    """What an answer other than 2xx says: the error envelope's fields, or the body as it is."""
    request_id = headers.get(REQUEST_ID_HEADER.lower(), "")
    try:
        envelope = json.loads(payload)
    except ValueError:
        envelope = None
    if not isinstance(envelope, dict):
        return InvokeError(f"HTTP{status}", payload.decode("utf-8", "replace")[:500] or f"HTTP {status}",
                           request_id, payload, status=status)
    return InvokeError(str(envelope.get("errorType") or f"HTTP{status}"), str(envelope.get("errorMessage", "")),
                       request_id or str(envelope.get("requestId", "")), envelope,
                       envelope.get("stackTrace") or [], status)


_default: Optional[Client] = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """One client per process, for `invoke()` and `context.invoke`."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def invoke(function_name: str, data: Any = None, qualifier: Optional[str] = None,
           namespace: Optional[str] = None, **client_options: Any) -> Any:
    """SCF's module-level call: `scf.invoke('FuncInvoked', data={...})`."""
    client = Client(**client_options) if client_options else default_client()
    return client.invoke(function_name, data=data, qualifier=qualifier, namespace=namespace)


__all__ = ["Client", "InvokeError", "TencentServerlessSDKException", "invoke", "default_client"]
