"""The HTTP server (`server:` in application.yml): the invoke API, HTTP functions, /healthz,
/metrics and /status. Served by waitress in threads of its own, apart from the MQTT path; a call
waits in its server thread while the function's pool runs it like any message.

    POST /invoke/<function>       body = event; response = result (JSON, bytes or 204)
    ANY  /http/<function>/<path>  served by a `type: http` function (a WSGI application)
    GET  /healthz                 200 when connected and every `min` instance is up, else 503
    GET  /metrics                 Prometheus text format
    GET  /status                  functions, instances and counters as JSON
    POST /reload                  re-read the configuration (control socket; here only with a token)
    POST /restart/<function>      new instances of the function's code (the same)
    GET  /console                 the console: a page for people (api/console.py)
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple
from urllib.parse import parse_qs, quote

from runtime_python._pb import function_pb2 as pb
from runtime_python.sdk import CHAIN_HEADER, DEADLINE_HEADER, REQUEST_ID_HEADER

from ..config import Function, Server
from .calls import (Refused, chain_of, check_size, error_answer, event_answer, find, offer,
                    timed_out, wait_of)
from ..errors import InvocationError
from ..invocation import Invocation, failure, new_request_id
from ..pool import Pool

if TYPE_CHECKING:   # a daemon without a server (the control socket's Api) loads neither
    from .console import Console
    from .history import Failures

log = logging.getLogger("openedge_function.api")

# (reload, restart): each says whether it was done, and what happened or why not.
Verbs = Tuple[Callable[[], Tuple[bool, str]], Callable[[str], Tuple[bool, str]]]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade"}
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
            431: "Request Header Fields Too Large", 508: "Loop Detected"}
# Refusals of calls to no function at all: not failures of any function's.
_NOT_RECORDED = {"UnknownFunction", "NotAnEventFunction", "NotAnHttpFunction"}
_CHAIN_KEY = "HTTP_" + CHAIN_HEADER.upper().replace("-", "_")         # as the WSGI environ has them
_DEADLINE_KEY = "HTTP_" + DEADLINE_HEADER.upper().replace("-", "_")


class _Call:
    """One HTTP request waiting for its invocation's outcome."""

    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.outcome: Any = None

    def done(self, invocation: Invocation, outcome: Any) -> None:
        self.outcome = outcome
        self.event.set()

    def abandon(self, invocation: Invocation) -> None:
        self.outcome = Refused("Unavailable", "the daemon is stopping")
        self.event.set()


def _status_line(code: int) -> str:
    return f"{code} {_REASONS.get(code, '')}".rstrip()


class Api:
    """The WSGI application of the daemon's own server."""

    def __init__(self, server: Server, metrics: Any, pools: Callable[[], Dict[str, Pool]],
                 health: Callable[[], Tuple[bool, List[str], List[str]]], status: Callable[[], dict],
                 verbs: Optional[Verbs] = None, console: Optional[Console] = None,
                 failures: Optional[Failures] = None) -> None:
        self.metrics = metrics
        self._pools = pools       # the running configuration's pools, by function name
        self._health = health
        self._status = status
        self._verbs = verbs       # reload and restart: on the control socket, or behind a token
        self._bearer = f"Bearer {server.token}" if server.token else ""
        self._console = console
        self._failures = failures   # where calls answered with an envelope are recorded

    # -- routing -------------------------------------------------------------------------------

    def __call__(self, environ: Dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        bearer = bool(self._bearer) and hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(),
                                                            self._bearer.encode())
        if self._console is not None and (path == "/console" or path.startswith("/console/")):
            status, headers, body = self._console(environ, path, bearer)
            start_response(status, headers + [("Content-Length", str(len(body)))])
            return [body]
        if self._bearer and not bearer and not (
                self._console is not None and path.startswith("/invoke/") and self._console.may_invoke(environ)):
            return self._error(start_response, Refused("Unauthorized", "a bearer token is required "
                               "(Authorization: Bearer <server.token>)"), "")
        if path.startswith("/invoke/"):
            if method != "POST":
                return self._error(start_response,
                                   Refused("MethodNotAllowed", "use POST /invoke/<function>"), "")
            return self._invoke(environ, start_response, path[len("/invoke/"):])
        if path.startswith("/http/"):
            name, _, rest = path[len("/http/"):].partition("/")
            return self._http(environ, start_response, name, "/" + rest)
        if path == "/healthz":
            ok, reasons, warnings = self._health()
            body = json.dumps({"status": "ok" if ok else "unavailable", "reasons": reasons,
                               "warnings": warnings}).encode()
            return self._reply(start_response, 200 if ok else 503, body, "application/json")
        if path == "/metrics":
            body, content_type = self.metrics.render()
            return self._reply(start_response, 200, body, content_type)
        if path == "/status":
            body = json.dumps(self._status(), indent=2).encode()
            return self._reply(start_response, 200, body, "application/json")
        if self._verbs is not None and (path == "/reload" or path.startswith("/restart/")):
            if method != "POST":
                return self._error(start_response, Refused("MethodNotAllowed", f"use POST {path}"), "")
            reload, restart = self._verbs
            ok, text = reload() if path == "/reload" else restart(path[len("/restart/"):])
            body = json.dumps({"ok": ok, "message": text}).encode()
            return self._reply(start_response, 200 if ok else 409, body, "application/json")
        return self._error(start_response, Refused("NotFound", f"no such endpoint: {method} {path}"),
                           "")

    # -- the invoke API ---------------------------------------------------------------------------

    def _invoke(self, environ: Dict[str, Any], start_response: Callable, name: str) -> Iterable[bytes]:
        def extra() -> Dict[str, Any]:
            return {"content_type": environ["CONTENT_TYPE"]} if environ.get("CONTENT_TYPE") else {}

        def answer(outcome: Any, request_id: str) -> Iterable[bytes]:
            status, content_type, body = event_answer(outcome, request_id, name)
            return self._reply(start_response, status, body, content_type or None, request_id)

        return self._serve(environ, start_response, name, "event", environ.get("QUERY_STRING", ""),
                           extra, answer)

    # -- HTTP functions ------------------------------------------------------------------------------

    def _http(self, environ: Dict[str, Any], start_response: Callable, name: str,
              path: str) -> Iterable[bytes]:
        def extra() -> Dict[str, Any]:
            query = environ.get("QUERY_STRING", "")
            script = f"/http/{quote(name)}"
            uri = script + quote(path) + (f"?{query}" if query else "")
            headers = [pb.Header(name=key[5:].replace("_", "-").title(), value=value)
                       for key, value in environ.items() if key.startswith("HTTP_")]
            if environ.get("CONTENT_TYPE"):
                headers.append(pb.Header(name="Content-Type", value=environ["CONTENT_TYPE"]))
            http = pb.HttpRequest(
                method=environ["REQUEST_METHOD"], script_name=script, path=path, query=query,
                protocol=environ.get("SERVER_PROTOCOL", "HTTP/1.1"),
                scheme=environ.get("wsgi.url_scheme", "http"),
                server_name=str(environ.get("SERVER_NAME", "")),
                server_port=str(environ.get("SERVER_PORT", "")),
                remote_addr=str(environ.get("REMOTE_ADDR", "")), request_uri=uri, headers=headers)
            return {"http": http, "content_type": environ.get("CONTENT_TYPE", "")}

        def answer(outcome: Any, request_id: str) -> Iterable[bytes]:
            reply = outcome.http
            headers = [(h.name, h.value) for h in reply.headers if h.name.lower() not in _HOP_BY_HOP]
            headers.append((REQUEST_ID_HEADER, request_id))
            start_response(reply.status or "200 OK", headers)
            return [reply.body]

        return self._serve(environ, start_response, name, "http", "", extra, answer)

    def _serve(self, environ: Dict[str, Any], start_response: Callable, name: str, kind: str, query: str,
               extra: Callable[[], Dict[str, Any]],
               answer: Callable[[Any, str], Iterable[bytes]]) -> Iterable[bytes]:
        """Run a call to function `name`, which must be of `kind`; failures answer the envelope."""
        request_id = new_request_id()
        body = b""
        try:
            function, pool = self._function(name, query)
            if function.type != kind:
                raise (Refused("NotAnEventFunction", f"function {name!r} is an HTTP function: send "
                                f"requests to /http/{name}/") if kind == "event" else
                       Refused("NotAnHttpFunction", f"function {name!r} is not an HTTP function "
                                f"(type: http): call it with POST /invoke/{name}"))
            body = self._body(environ, function)
            outcome = self._run(pool, function, request_id, body, extra(), environ)
        except Refused as refused:
            if refused.error_type not in _NOT_RECORDED:
                self._record(refused, name, request_id, kind, body)
            return self._error(start_response, refused, request_id, name)
        error = failure(outcome)
        if error is not None:
            self._record(error, name, request_id, kind, body)
            return self._error(start_response, error, request_id, name)
        return answer(outcome, request_id)

    def _record(self, error: InvocationError, name: str, request_id: str, kind: str, body: bytes) -> None:
        """A call answered with an envelope, for the console's recent failures."""
        if self._failures is not None:
            self._failures.record(error, name, request_id, "invoke API" if kind == "event" else "HTTP",
                                  f"/invoke/{name}" if kind == "event" else f"/http/{name}/", body)

    # -- shared ------------------------------------------------------------------------------------

    def _function(self, name: str, query: str) -> Tuple[Function, Pool]:
        params = parse_qs(query)
        return find(self._pools(), name, params.get("qualifier", [""])[0], params.get("namespace", [""])[0])

    @staticmethod
    def _body(environ: Dict[str, Any], function: Function) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        check_size(function, length)
        return environ["wsgi.input"].read(length) if length else b""

    def _run(self, pool: Pool, function: Function, request_id: str, body: bytes,
             extra: Dict[str, Any], environ: Dict[str, Any]) -> Any:
        """Hand the call to the pool and wait for its outcome."""
        chain = chain_of(environ.get(_CHAIN_KEY, ""))
        if chain:
            extra["call_chain"] = chain
        wait = wait_of(environ.get(_DEADLINE_KEY, ""))
        call = _Call()
        invocation = Invocation(request_id, "", 0, body, int(time.time() * 1000), 0, call.done, call.abandon)
        invocation.extra = extra
        offer(pool, invocation, chain)
        if not call.event.wait(wait):
            if pool.withdraw(invocation):
                assert wait is not None
                raise timed_out(function, wait)
            # It runs: the pool answers within the function's timeout.
            call.event.wait()
        return call.outcome

    def _error(self, start_response: Callable, error: InvocationError, request_id: str,
               name: str = "") -> Iterable[bytes]:
        """The error envelope (the MQTT one without `packet`), with the status that fits."""
        status, content_type, body = error_answer(error, request_id, name)
        return self._reply(start_response, status, body, content_type, request_id)

    @staticmethod
    def _reply(start_response: Callable, status: int, body: bytes, content_type: Optional[str],
               request_id: str = "") -> Iterable[bytes]:
        headers = [("Content-Length", str(len(body)))]
        if content_type:
            headers.append(("Content-Type", content_type))
        if request_id:
            headers.append((REQUEST_ID_HEADER, request_id))
        start_response(_status_line(status), headers)
        return [body]


# What waitress refuses before the application sees a request, as the API's error types.
_REFUSED = {413: "MessageTooLarge", 431: "HeadersTooLarge"}
_LINGER = 2.0   # seconds a refused client may go on sending before its connection is closed
# Slow clients (slowloris: headers one line at a time, or a connection held open and silent):
# from the moment the server waits for a request on a connection (accepted, or idle after an
# answer) its headers must be in within HEADER_TIMEOUT seconds; and one client address holds at
# most WAITING_PER_CLIENT connections that wait so, a new one closing its longest-waiting one.
HEADER_TIMEOUT = 10.0
WAITING_PER_CLIENT = 16


def _channel_class() -> type:
    """waitress's connection, with what a request refused early (headers over
    `HEADERS_MAX`, a body over server.body.max, a malformed request) needs: the refusal is the
    API's JSON envelope, and the connection ends with a lingering close. The client is usually
    still sending when the refusal goes out; closing with its bytes unread would reset the
    connection, and the reset would discard the status before the client read it. So the
    connection stops writing and reads (and drops) what still comes, until the client closes or
    _LINGER runs out."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class RefusalTask(ErrorTask):
        def execute(self) -> None:
            error = self.request.error
            what = {413: f"the request body is over server.body.max ({self.channel.adj.max_request_body_size} bytes)",
                    431: f"the request's headers are over {self.channel.adj.max_request_header_size} bytes"}
            refused = Refused(_REFUSED.get(error.code, "BadRequest"), what.get(error.code, error.body))
            _, content_type, body = error_answer(refused, "", "")
            self.status = _status_line(error.code) if error.code in _REASONS else f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", content_type))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)
            self.channel.linger = True

    class Channel(HTTPChannel):
        error_task_class = RefusalTask
        linger = False          # the response was a refusal: linger when closing
        lingering_until = 0.0
        waiting_since = 0.0     # the server waits for this connection's request headers since
        served = False          # a request of this connection was answered

        def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
            super().__init__(server, sock, addr, adj, map)
            self.waiting_since = time.monotonic()
            client = _client(addr)
            waiting = [channel for channel in list(server._map.values())
                       if getattr(channel, "waiting_since", 0.0) and channel is not self
                       and _client(channel.addr) == client]
            if len(waiting) >= WAITING_PER_CLIENT:
                oldest = min(waiting, key=lambda channel: channel.waiting_since)
                oldest.waiting_since = 0.0
                oldest.will_close = True
                _note_slow(client, f"over {WAITING_PER_CLIENT} of its connections wait for their "
                                   "request headers: closing the longest-waiting one")

        def _waits_too_long(self) -> bool:
            """Whether the request headers this connection owes are late (on the server's thread)."""
            request = self.request
            if self.requests or self.total_outbufs_len or (request is not None and request.headers_finished):
                self.waiting_since = 0.0   # served, answered, or sending its body
                self.served = True
                return False
            now = time.monotonic()
            if not self.waiting_since:
                self.waiting_since = now
                return False
            if now - self.waiting_since <= HEADER_TIMEOUT:
                return False
            client = _client(self.addr)
            if request is not None or not self.served:   # an idle keep-alive one just closes
                _note_slow(client, f"a request's headers took over {HEADER_TIMEOUT:g} s: closed")
            self.waiting_since = 0.0
            self.will_close = True
            return True

        def handle_close(self) -> None:
            if self.linger and not self.lingering_until and self.connected:
                try:
                    self.socket.shutdown(socket.SHUT_WR)   # the refusal is sent: no more writes
                except OSError:
                    pass
                else:
                    self.lingering_until = time.monotonic() + _LINGER
                    return
            super().handle_close()

        def readable(self) -> bool:
            if self.lingering_until:
                return True
            if not self.will_close and self._waits_too_long():
                return False
            return super().readable()

        def writable(self) -> bool:
            if self.lingering_until:   # "writable" once the time is up: handle_write closes
                return time.monotonic() > self.lingering_until
            return super().writable()

        def handle_write(self) -> None:
            if self.lingering_until:
                super().handle_close()
                return
            super().handle_write()

        def handle_read(self) -> None:
            if not self.lingering_until:
                super().handle_read()
                return
            try:
                self.recv(65536)   # dropped; end-of-file or an error closes (wasyncore's recv)
            except OSError:
                super().handle_close()

    return Channel


_slow_noted: Dict[str, float] = {}


def _client(addr: Any) -> str:
    """A connection's client address, without its port."""
    return addr[0] if isinstance(addr, tuple) else addr


def _note_slow(client: str, what: str) -> None:
    """Log a slow client once a minute at most (an attack would otherwise write the log full)."""
    now = time.monotonic()
    if now - _slow_noted.get(client, -60.0) >= 60.0:
        if len(_slow_noted) > 1024:
            _slow_noted.clear()
        _slow_noted[client] = now
        log.warning("HTTP client %s: %s", client, what)


HEADERS_MAX = 256 << 10   # the request line and headers of one request (waitress's default)


class HttpServer:
    """waitress serving `Api` in a thread of its own."""

    def __init__(self, app: Api, server: Server) -> None:
        from waitress.server import create_server
        self._server = create_server(
            app, host=server.host, port=server.port, threads=server.threads, ident="openedge-function",
            max_request_body_size=server.body_max, max_request_header_size=HEADERS_MAX,
            expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        self._server.channel_class = _channel_class()
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop listening and drop open connections; the calls they wait on are settled already."""
        server = self._server

        def close_all() -> None:
            for channel in list(server._map.values()):
                channel.close()

        try:
            server.trigger.pull_trigger(close_all)
        except OSError:
            pass
        self._thread.join(5)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)

