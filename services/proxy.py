"""The moving parts of `python -m services.serve`: model servers (`mlflow models serve`) on internal
ports of 127.0.0.1, a reverse proxy in front of them that forwards each request to one of them and
switches between two requests, and the supervisor that starts, switches and stops them as the
alias moves. A switch fails no request, and sends none to a server being stopped.

Each answer carries `X-Model-Version`: the registered version of the server that produced it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ftpipe.credentials import redact
from ftpipe.errors import PipelineError
from ftpipe.processes import stop_group

VERSION_HEADER = "X-Model-Version"
HOST = "127.0.0.1"
# Downloading a 1.7B model from the team's S3 store and loading it on a CPU takes minutes; a server
# that has not answered /ping after half an hour is stuck, not slow.
READY_TIMEOUT_S = 1800
# Bounds a request to a hung model server only: the server enforces its own timeout per request
# (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), and a slow generation on CPU must not be cut short here.
BACKEND_TIMEOUT_S = 600
STOP_TIMEOUT_S = 15  # a drained server's graceful shutdown takes about a second
# Headers of one connection, not of the message (RFC 9110 7.6.1), plus those this server writes itself.
_NOT_FORWARDED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length", "server", "date"}


@dataclass(eq=False)  # compared by identity: two servers of one version are two backends
class Backend:
    """A model server on HOST:`port` serving registered version `version`."""

    version: str
    port: int
    proc: subprocess.Popen | None = None


class Router:
    """Which backend answers, and how many requests each has in flight. A request holds its backend
    until its answer is read, so a switched-away server can be drained before it is stopped."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._current: Backend | None = None
        self._in_flight: Counter[Backend] = Counter()

    @property
    def current(self) -> Backend | None:
        return self._current

    @contextlib.contextmanager
    def backend(self) -> Iterator[Backend | None]:
        with self._changed:
            backend = self._current
            self._in_flight[backend] += 1
        try:
            yield backend
        finally:
            with self._changed:
                self._in_flight[backend] -= 1
                if not self._in_flight[backend]:
                    del self._in_flight[backend]  # a switched-away backend is forgotten once drained
                self._changed.notify_all()

    def switch(self, new: Backend) -> Backend | None:
        """Send every later request to `new`; the backend it replaces."""
        with self._changed:
            old, self._current = self._current, new
        return old

    def drain(self, backend: Backend, timeout: float = BACKEND_TIMEOUT_S) -> bool:
        """Wait until `backend` has no request in flight; False if some were still running at `timeout`."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight[backend] == 0, timeout)


def forward(port: int, method: str, path: str, headers, body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) of the server on HOST:`port`'s answer. http.client, not urllib:
    urllib would send a loopback request through a proxy that HTTP_PROXY names."""
    conn = http.client.HTTPConnection(HOST, port, timeout=BACKEND_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers={k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED})
        answer = conn.getresponse()
        return answer.status, [(k, v) for k, v in answer.getheaders() if k.lower() not in _NOT_FORWARDED], answer.read()
    finally:
        conn.close()


class _Handler(BaseHTTPRequestHandler):
    router: Router  # set on the subclass that make_server builds

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with self.router.backend() as backend:
            if backend is None:
                return self._reply(503, [("Content-Type", "text/plain")], b"no model loaded yet\n")
            try:
                status, headers, data = forward(backend.port, self.command, self.path, self.headers, body)
            except OSError as exc:  # the model server died or hung: say which, as the client's error
                return self._reply(502, [("Content-Type", "text/plain")],
                                   f"model server of v{backend.version} failed: {exc}\n".encode(), backend)
        self._reply(status, headers, data, backend)

    do_POST = do_GET

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, backend: Backend | None = None) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if backend is not None:
            self.send_header(VERSION_HEADER, backend.version)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass  # the model server logs every request already; one access line per request is enough


def make_server(port: int, router: Router) -> ThreadingHTTPServer:
    """The proxy, bound to HOST:`port` now (a busy port fails at once); serve_forever() starts it."""
    handler = type("Handler", (_Handler,), {"router": router})
    return ThreadingHTTPServer((HOST, port), handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def answers_ping(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a model server's process group and wait for all of it: uvicorn, which mlflow's CLI forks,
    finishes its graceful shutdown after the CLI has exited, and holds the model's memory until then."""
    stop_group(proc, signal.SIGTERM, STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):  # bounded: an orphan nobody reaps stays a zombie, which no signal ends
        os.killpg(proc.pid, signal.SIGKILL)


def warn(message: str) -> None:
    print(f"serve: warning: {' '.join(redact(message).split())}", flush=True)


class Supervisor:
    """The model servers of `name`@`alias`: starts, switches and stops them. `resolve()` reads the
    version the alias names (None: no such alias); `command(version, port)` is a server's command
    line. Every server runs in its own process group (mlflow's CLI forks uvicorn), stopped as a whole."""

    def __init__(self, *, name: str, alias: str, resolve: Callable[[], str | None],
                 command: Callable[[str, int], list[str]], env: dict[str, str], router: Router) -> None:
        self.where, self.resolve, self.command, self.env, self.router = f"{name}@{alias}", resolve, command, env, router
        self.failed: str | None = None  # a version whose server did not start: not retried until the alias moves
        self._servers: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def launch(self, version: str) -> Backend:
        """Version `version`'s server on a free internal port, once it answers /ping."""
        port = free_port()
        proc = subprocess.Popen(self.command(version, port), env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        with self._lock:
            self._servers.append(proc)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not answers_ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"did not answer in {READY_TIMEOUT_S} s" if proc.returncode is None else f"exited with {proc.returncode}"
                self._stop(proc)
                raise PipelineError(f"the model server of {self.where} v{version} {why} (its output above)")
            time.sleep(0.5)
        return Backend(version, port, proc)

    def check(self) -> None:
        """Follow the alias once: a version it newly names replaces the served one; a registry that
        cannot be read or an alias that is gone leaves the served model answering, with a warning."""
        current = self.router.current
        try:
            version = self.resolve()
        except PipelineError as exc:
            return warn(f"{exc}; still serving v{current.version}")
        if version is None:
            return warn(f"{self.where} no longer exists; still serving v{current.version}")
        if version in (current.version, self.failed):
            return
        print(f"serve: {self.where} moved to v{version}: starting it beside v{current.version}", flush=True)
        try:
            new = self.launch(version)
        except PipelineError as exc:
            self.failed = version
            return warn(f"{exc}; still serving v{current.version}, v{version} not retried until the alias moves again")
        self.failed = None
        old = self.router.switch(new)
        drained = self.router.drain(old)
        self._stop(old.proc)
        print(f"serve: {self.where} switched from v{old.version} to v{version} (process group {new.proc.pid}, "
              f"port {new.port}); v{old.version} stopped{'' if drained else ' with requests still in flight'}", flush=True)

    def _stop(self, proc: subprocess.Popen) -> None:
        stop_server(proc)
        with self._lock:
            self._servers.remove(proc)

    def stop_all(self) -> None:
        with self._lock:
            servers, self._servers = self._servers, []
        for proc in servers:
            stop_server(proc)
