"""Real faults for the fault tests: a TCP proxy that can cut a service off, worker processes.

``TcpProxy`` sits between a client (a worker process, say) and a real service (PostgreSQL,
Redis). ``cut()`` drops every open connection and refuses new ones until ``restore()``: from the
client's side that is exactly a database or broker going away and coming back, without touching
the service that other processes share.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``(host, target_port)`` until told to cut the line."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._drop_all = threading.Event()
        self._dropped = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    # control
    def cut(self) -> None:
        """Drop every open connection and refuse new ones (returns once they are dropped)."""
        self._cut.set()
        self._dropped.clear()
        self._drop_all.set()  # the proxy's own thread drops them: selectors are not thread-safe
        self._dropped.wait(timeout=5)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # the thread is gone: dropping here is safe
        with self._lock:
            for sock in list(self._peers):
                self._drop(sock)
        self._selector.close()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            if self._drop_all.is_set():
                with self._lock:
                    for sock in list(self._peers):
                        self._drop(sock)
                self._drop_all.clear()
                self._dropped.set()
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                if sock is self._listener:
                    self._accept()
                    continue
                with self._lock:
                    peer = self._peers.get(sock)
                    if peer is None:
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(sock)
                        continue
                    try:
                        peer.sendall(data)
                    except OSError:
                        self._drop(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._cut.is_set():
            client.close()  # connection refused, as far as the client can tell
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        with self._lock:
            self.connections += 1
            for a, b in ((client, upstream), (upstream, client)):
                a.setblocking(True)
                self._peers[a] = b
                self._selector.register(a, selectors.EVENT_READ, None)

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class WorkerProcess:
    """A real ``celery worker`` in its own process (solo pool), which a test may ``kill -9``."""

    def __init__(
        self, env: dict[str, str], name: str, queues: str = "latents.encode", fault: str = ""
    ) -> None:
        self.env = {**env, "LATENTSTORE_FAULT": fault} if fault else env
        self.name = name
        self.queues = queues
        self.fault = fault
        self.proc: subprocess.Popen | None = None
        self.log = Path(env.get("LATENTSTORE_VAR_DIR", "/tmp")) / f"worker-{name}.log"

    def start(self) -> WorkerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # With a fault, tests.fault_worker injects it and then runs the same worker.
        launcher = ["tests.fault_worker"] if self.fault else ["celery", "-A", "project"]
        cmd = [
            sys.executable,
            "-m",
            *launcher,
            "worker",
            "-P",
            "solo",
            "-Q",
            self.queues,
            "--loglevel=INFO",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"{self.name}-{os.getpid()}@%h",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for Celery's "ready." line (the worker consumes from then on)."""

        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"worker {self.name} exited:\n{self.output()[-3000:]}")
            return " ready." in self.output()

        wait_until(ready, timeout=timeout, interval=0.1, what=f"worker {self.name} to start")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> WorkerProcess:
        """Start the worker and wait until it consumes (stopped again if it never does)."""
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


@contextlib.contextmanager
def proxied(port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(port)
    try:
        yield proxy
    finally:
        proxy.close()
