"""Real servers on 127.0.0.1 for the object-storage tests: moto's S3 server, a static HTTP
server, and a TCP proxy that resets connections mid-response."""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port


@contextlib.contextmanager
def _server_process(name: str, module: str, args: list[str], ready_path: str, timeout: float):
    """Run the server ``name`` (its console script, else ``python -m module``) with ``args``
    (``{port}`` filled in) on 127.0.0.1 until ``ready_path`` answers; yields its URL, stops it
    afterwards."""
    port = free_port()
    exe = shutil.which(name, path=str(Path(sys.executable).parent))
    launcher = [exe] if exe else [sys.executable, "-m", module]
    argv = [*launcher, *(arg.format(port=port) for arg in args)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}{ready_path}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start on {url}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def moto_server(timeout: float = 60.0) -> Iterator[str]:
    """``moto_server`` (S3 API, in memory) in a subprocess; yields its endpoint URL."""
    with _server_process(
        "moto_server", "moto.server", ["-H", "127.0.0.1", "-p", "{port}"], "/moto-api/", timeout
    ) as url:
        yield url


@contextlib.contextmanager
def gcs_emulator(bucket: str, timeout: float = 60.0) -> Iterator[str]:
    """``gcp-storage-emulator`` (the GCS JSON API, in memory) in a subprocess with ``bucket``;
    yields its URL, to be put in ``STORAGE_EMULATOR_HOST`` (gcsfs then needs no credentials)."""
    options = ["--host", "127.0.0.1", "--port", "{port}", "--in-memory", "--default-bucket"]
    ready = f"/storage/v1/b/{bucket}"
    with _server_process(
        "gcp-storage-emulator", "gcp_storage_emulator", ["start", *options, bucket], ready, timeout
    ) as url:
        yield url


@contextlib.contextmanager
def static_http(root: Path) -> Iterator[str]:
    """Python's file server on ``root`` (no Range support: resumes must cope with that)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Fault:
    """Drop the connection once ``after_bytes`` of answers to requests naming ``path`` went
    through (counted over all connections since the last drop, as ranged reads spread a shard
    over several requests).

    ``times`` drops are injected (None: forever); with ``then_refuse`` every answer after the
    first drop is dropped before its first byte (a server that stays down). With
    ``from_offset``, requests for a byte range starting at or past it are dropped before their
    first byte instead (the store goes down once a reader got that far).
    """

    path: str
    after_bytes: int
    times: int | None = 1
    then_refuse: bool = False
    from_offset: int | None = None  # instead: refuse every ranged request starting there
    resets: int = 0
    sent: int = 0

    def budget(self) -> int | None:
        """Bytes that may still go through before the next drop; None when the fault is spent."""
        if self.times is not None and self.resets >= self.times:
            return None
        return 0 if self.then_refuse and self.resets else self.after_bytes - self.sent


class ResetProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of ``upstream`` that injects resets.

    It watches the requests going up; a connection that carried a request naming
    ``fault.path`` is dropped as :class:`Fault` says (as a crashing or restarting server would).
    ``latency`` seconds are added before every request goes up (a distant object store's time
    to first byte).
    """

    def __init__(self, upstream: str, latency: float = 0.0):
        host, port = upstream.rsplit("//", 1)[-1].split(":")
        self.upstream = (host, int(port))
        self.latency = latency
        self.fault: Fault | None = None
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        self.requests: list[str] = []  # request lines seen ("PUT /bucket/key HTTP/1.1")
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _reset(client)
                continue
            state: dict = {"fault": None}
            with self.lock:
                self.connections += [client, server]
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                if line.split(b" ", 1)[0] in (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE"):
                    self.requests.append(line.decode("latin-1"))
                    if self.latency:
                        time.sleep(self.latency)
                fault = self.fault
                if fault and fault.path.encode() in line:
                    state["fault"] = fault
                    start = re.search(rb"(?i)\r\nrange: *bytes=(\d+)-", data)
                    if fault.from_offset is not None:
                        offset = int(start.group(1)) if start else 0
                        state["refuse"] = offset >= fault.from_offset
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _down(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                fault = state["fault"]
                if fault is not None and fault.from_offset is not None:
                    if state.get("refuse"):
                        with self.lock:
                            fault.resets += 1
                        _reset(client)
                        _reset(server)
                        return
                elif fault is not None:
                    with self.lock:
                        room = fault.budget()
                        drop = room is not None and len(data) > room
                        if drop:
                            fault.resets, fault.sent = fault.resets + 1, 0
                        elif room is not None:
                            fault.sent += len(data)
                    if drop:
                        client.sendall(data[:room])
                        _reset(client)
                        _reset(server)
                        return
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for sock in self.connections:
                with contextlib.suppress(OSError):
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Drop the connection now: shut it down (forked DataLoader workers share the descriptor,
    so a close alone would wait for them), then close with RST (SO_LINGER zero)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
