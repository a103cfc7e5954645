"""The local control socket: the daemon's API over a Unix socket, always on, with or without
`server:`. `openedge-function status|invoke|reload|restart` talk to it first, as `supervisorctl`
and `mosquitto_ctrl` talk to theirs.

It speaks the HTTP server's API (api/server.py: /status, /healthz, /invoke/<function>, and
/metrics with a server) with what an operator does to a running daemon: POST /reload (as SIGHUP
does; the answer says how it went) and POST /restart/<function> (new instances of its code; the
old ones finish what they run).

Who may talk to it is who may open the socket: its file is 0600, the daemon's user's, or 0660
with `control.group`; the directory above it lets others pass, not list. Requests are served in
threads of their own (at most `THREADS` at once), each bounded by `TIMEOUT` while it is read.
Standard library only: a daemon without `server:` does not load the HTTP server's packages.
"""
from __future__ import annotations

import logging
import os
import socket
import socketserver
import stat
import threading
from typing import Any, Callable, Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

log = logging.getLogger("openedge_function.control")

THREADS = 8       # requests served at once; more wait in the listen backlog
TIMEOUT = 10.0    # seconds a request may take to arrive


class _Handler(WSGIRequestHandler):
    timeout = TIMEOUT

    def setup(self) -> None:
        self.client_address = ("local", 0)   # a Unix socket's peer has no address
        super().setup()

    def address_string(self) -> str:
        return "local"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("control socket: " + format, *args)

    def get_stderr(self) -> Any:
        class _Log:
            def write(self, text: str) -> None:
                log.error("control socket: %s", text.rstrip())

            def flush(self) -> None:
                pass
        return _Log()


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    address_family = socket.AF_UNIX
    daemon_threads = True
    request_queue_size = 16

    def __init__(self, path: str, app: Callable) -> None:
        self._slots = threading.BoundedSemaphore(THREADS)
        super().__init__(path, _Handler, bind_and_activate=True)
        self.set_app(app)

    def server_bind(self) -> None:   # WSGIServer's asks for a host and port
        socketserver.UnixStreamServer.server_bind(self)
        self.server_name, self.server_port = "local", 0
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("control socket: a request failed")

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ControlSocket:
    """The listening socket at `path` and its thread; `close()` removes it."""

    def __init__(self, path: str, app: Callable, gid: Optional[int] = None) -> None:
        self.path = path
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o711)
            os.chmod(parent, 0o711)   # whatever the umask: others pass, to a socket they may not open
        st = os.stat(parent)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise OSError(f"{parent} is not this user's own directory (owner uid {st.st_uid}, mode "
                          f"{st.st_mode & 0o7777:o}): another user could take the socket's place")
        if _answers(path):
            raise OSError(f"another daemon answers on {path}")
        try:
            os.unlink(path)   # a socket left by a daemon that did not stop cleanly
        except FileNotFoundError:
            pass
        old = os.umask(0o177)   # 0600 from the start: no moment when others may connect
        try:
            self._server = _Server(path, app)
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        self._inode = os.stat(path).st_ino
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.5,), name="control",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            st = os.stat(self.path)
            if st.st_ino == self._inode and stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)   # ours still, not a later daemon's
        except OSError:
            pass


def _answers(path: str) -> bool:
    """Whether a daemon listens on the socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
