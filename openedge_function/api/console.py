"""The console: a page the daemon's HTTP server serves at /console, and the data it polls.

    GET  /console                   the page (page/index.html, console.js, console.css: no CDN;
                                    the style alone is served to anyone, for the login page)
    POST /console/login             the token from the login form: a session cookie, back to /console
    GET  /console/logout            forgets the cookie
    GET  /console/api/state         functions, rules, health; `since=<time>`: samples after it only
    GET  /console/api/failures      the last error envelopes; `after=<seq>`: newer ones only
    GET  /console/api/logs          a function's last log lines; `function=`, `after=<seq>`, `limit=`

With `server.token` set, all of it is refused without the token: as `Authorization: Bearer` (as
the API takes it), or as the cookie the login form sets (HttpOnly, SameSite=Strict), which holds
a keyed hash of the token, not the token. The page invokes functions through the invoke API with
that cookie and a header of its own (`X-Console: 1`), which no other site's page can send. Without
a token (the server then listens on loopback only) the console answers requests for a loopback
host name only, so a page elsewhere cannot reach it through a name that resolves to 127.0.0.1.

The page polls (every POLL seconds while it is visible): what it shows is read when it asks, from
the daemon's state and the rings of api/history.py, so a console no one has open costs nothing.
"""
from __future__ import annotations

import hashlib
import hmac
import html
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs

import psutil

from ..config import Server
from .history import LOG_LINES, History

COOKIE = "oef_console"
CONSOLE_HEADER = "HTTP_X_CONSOLE"        # X-Console: 1, sent by the page's own requests
LOGIN_MAX = 4096                         # bytes of a login form
_PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page")
_ASSETS = {"/console/console.js": ("console.js", "text/javascript; charset=utf-8")}
_LOOPBACK = {"localhost", "127.0.0.1", "[::1]", "::1"}
# What the page may do in the browser: its own script and style, its own data, nothing else.
_HEADERS = [("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
                                        "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
                                        "frame-ancestors 'none'; base-uri 'none'"),
            ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store")]

Reply = Tuple[str, List[Tuple[str, str]], bytes]


class Console:
    """The console's routes; `state` builds what /console/api/state answers (see `state()`)."""

    def __init__(self, server: Server, history: History, state: Callable[[float], Dict[str, Any]]) -> None:
        self._token = server.token or ""
        self._session = (hmac.new(self._token.encode(), b"openedge-function console", hashlib.sha256).hexdigest()
                         if self._token else "")
        self.history = history
        self._state = state
        self._files: Dict[str, bytes] = {}

    # -- who may look ------------------------------------------------------------------------------

    def signed_in(self, environ: Dict[str, Any]) -> bool:
        """Whether the request carries the console's cookie (a token is set)."""
        if not self._session:
            return False
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self._session.encode()):
                return True
        return False

    def may_invoke(self, environ: Dict[str, Any]) -> bool:
        """A call of the invoke API from the page: its cookie and its own header."""
        return environ.get(CONSOLE_HEADER) == "1" and self.signed_in(environ)

    def _allowed(self, environ: Dict[str, Any], bearer: bool) -> bool:
        if self._token:
            return bearer or self.signed_in(environ)
        host = environ.get("HTTP_HOST", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower() in _LOOPBACK

    # -- routes -------------------------------------------------------------------------------------

    def __call__(self, environ: Dict[str, Any], path: str, bearer: bool) -> Reply:
        """Answer a request for `path` (under /console); `bearer`: it carries the API's token."""
        method = environ["REQUEST_METHOD"]
        if path == "/console/login" and method == "POST":
            return self._login(environ)
        if path == "/console/logout":
            return _redirect("/console", f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")
        if path == "/console/console.css":   # the login page's style too: nothing of the daemon's
            return "200 OK", [("Content-Type", "text/css; charset=utf-8")] + _HEADERS, self._file("console.css")
        if not self._allowed(environ, bearer):
            if path in ("/console", "/console/"):
                return self._login_page("", 401)
            return _json("401 Unauthorized", {"errorType": "Unauthorized",
                                              "errorMessage": "the console needs the server's token "
                                                              "(sign in at /console)"})
        if method != "GET":
            return _json("405 Method Not Allowed", {"errorType": "MethodNotAllowed",
                                                    "errorMessage": f"use GET {path}"})
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if path in ("/console", "/console/"):
            return "200 OK", [("Content-Type", "text/html; charset=utf-8")] + _HEADERS, self._file("index.html")
        if path in _ASSETS:
            name, content_type = _ASSETS[path]
            return "200 OK", [("Content-Type", content_type)] + _HEADERS, self._file(name)
        if path == "/console/api/state":
            return _json("200 OK", self._state(_number(query, "since", 0.0)))
        if path == "/console/api/failures":
            return _json("200 OK", {"failures": self.history.failures.after(int(_number(query, "after", 0)))})
        if path == "/console/api/logs":
            function = query.get("function", [""])[0]
            limit = int(min(max(_number(query, "limit", 200), 1), LOG_LINES))
            return _json("200 OK", {"function": function, "lines": self.history.logs.after(
                function, int(_number(query, "after", 0)), limit)})
        return _json("404 Not Found", {"errorType": "NotFound", "errorMessage": f"no such page: {path}"})

    def _login(self, environ: Dict[str, Any]) -> Reply:
        if not self._token:
            return _redirect("/console")
        try:
            length = min(int(environ.get("CONTENT_LENGTH") or 0), LOGIN_MAX)
        except ValueError:
            length = 0
        form = parse_qs(environ["wsgi.input"].read(length).decode("utf-8", "replace") if length else "")
        token = form.get("token", [""])[0].strip()
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            return self._login_page("That is not the server's token.", 401)
        return _redirect("/console", f"{COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict")

    def _login_page(self, problem: str, code: int) -> Reply:
        body = self._file("login.html").replace(b"{{problem}}", html.escape(problem).encode())
        return f"{code} Unauthorized", [("Content-Type", "text/html; charset=utf-8")] + _HEADERS, body

    def _file(self, name: str) -> bytes:
        data = self._files.get(name)
        if data is None:
            with open(os.path.join(_PAGE_DIR, name), "rb") as fh:
                data = self._files[name] = fh.read()
        return data


def _number(query: Dict[str, List[str]], key: str, default: float) -> float:
    try:
        value = float(query.get(key, [""])[0])
    except ValueError:
        return default
    return value if value == value and abs(value) != float("inf") else default


def _json(status: str, data: Any) -> Reply:
    return status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")], \
        json.dumps(data).encode()


def _redirect(to: str, cookie: str = "") -> Reply:
    headers = [("Location", to), ("Cache-Control", "no-store")]
    if cookie:
        headers.append(("Set-Cookie", cookie))
    return "303 See Other", headers, b""


# -- what the state endpoint answers ----------------------------------------------------------------

class Vitals:
    """The daemon's own memory and CPU (CPU: its share of one core since the last look)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)

    def read(self) -> Dict[str, Any]:
        process = self._process
        with process.oneshot():
            return {"rss_mb": round(process.memory_info().rss / 1048576, 1),
                    "cpu_percent": round(process.cpu_percent(None), 1), "threads": process.num_threads()}


def state(daemon: Any, report: Dict[str, Any], history: History, vitals: Vitals,
          since: float) -> Dict[str, Any]:
    """What the page shows: /status's `report` of `daemon`, with each function's last minute and
    samples after `since`, the rules' topics and flow, and the daemon's health."""
    samples = history.samples
    functions = []
    for name, row in report["functions"].items():
        pool = daemon.pools.get(name)
        limits = pool.function.instance if pool is not None else None
        counts = daemon.metrics.functions.get(name) if daemon.metrics is not None else None
        functions.append({
            "name": name, **row,
            "state": _function_state(row),
            "limits": {"memory_mb": (limits.memory >> 20) if limits else None,
                       "timeout_s": limits.timeout if limits else None, "pids": limits.pids if limits else None},
            "outcomes": dict(counts.outcomes) if counts is not None else {},
            "last_minute": samples.last(name), "series": samples.series(name, since)})
    rules = []
    for runner in list(daemon.rules):
        rule = runner.rule
        row = report["rules"].get(rule.name, {})
        rules.append({"name": rule.name, "function": runner.function.name,
                      "in": _source(rule.subscribe), "out": _target(rule.publish),
                      "error": _target(rule.error) if rule.error else None,
                      "paused": list(getattr(runner.intake, "paused", ())), **row})
    connections = [{"name": "publisher", "address": report["broker"]["address"],
                    "connected": report["broker"]["connected"]}]
    connections += [{"name": f"rule {rule['name']}", "address": rule["in"], "connected": rule.get("connected")}
                    for rule in rules]
    if getattr(daemon, "nats_publisher", None) is not None:
        connections.append({"name": "NATS publisher", "address": ", ".join(daemon.config.nats.servers),
                            "connected": daemon.nats_publisher.connected.is_set()})
    return {"time": round(time.time(), 3), "version": report["version"], "pid": report["pid"],
            "uptime_s": report["uptime_s"], "healthy": report["healthy"], "reasons": report["reasons"],
            "warnings": report["warnings"], "functions": functions, "rules": rules,
            "health": {"connections": connections, "daemon": vitals.read(), "limits": daemon.limits}}


def _function_state(row: Dict[str, Any]) -> str:
    """One word for a function's row: failing, installing, last good, busy, idle, starting or stopped."""
    if row.get("failing"):
        return "failing"
    if row.get("packages") == "installing":
        return "installing"
    if row["code"]["serving"] == "last good":
        return "last good"
    states = row.get("states", {})
    if states.get("busy"):
        return "busy"
    if row.get("idle"):
        return "idle"
    if row.get("starting"):
        return "starting"
    return "stopped"   # no instance now (min: 0): one starts with the next message


def _source(subscription: Any) -> str:
    if subscription.stream:
        return f"stream {subscription.stream} {subscription.subject}".rstrip() + f" (QoS {subscription.qos})"
    return f"{subscription.topic} (QoS {subscription.qos})"


def _target(publication: Any) -> Optional[str]:
    if publication is None:
        return None
    if publication.subject:
        return f"subject {publication.subject}"
    return f"{publication.topic} (QoS {publication.qos})"

