"""Run the real ``tunnel run`` daemon as a subprocess for system tests.

:func:`run_tunnel` writes one YAML file per tunnel document, starts the daemon with
its stderr in a log file, waits for the ``ready tunnels=N`` line (every listener is
bound and listening by then, so no probe connection is needed: a probe would show up
in the log as a refused handshake), and on exit sends SIGTERM and checks that the
daemon drained and exited with status 0.

Also here: YAML document builders for server/client tunnels and a tiny thread-based
TCP target that reads to EOF and replies with the sha256 of what it got (the
half-close probe used by the stunnel tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests import helpers
from tests.helpers import PKI
from tests.system.services import LOCALHOST, require_tool

#: Timeouts given to every tunnel the system tests start: short enough that a stuck
#: connection cannot outlive the 10 s SIGTERM grace period of :func:`run_tunnel`.
TEST_LIMITS: dict[str, str] = {
    "handshake_timeout": "5s",
    "connect_timeout": "5s",
    "drain_timeout": "5s",
}

_LISTENING_RE = re.compile(r"listening tunnel=(?P<name>\S+) .*?listen=(?P<listen>\S+)")
_READY_RE = re.compile(r"\bready tunnels=(?P<count>\d+)")


MIB = 1024 * 1024


class TunnelProcessError(RuntimeError):
    """The tunnel daemon did not start, or misbehaved."""


def tunnel_command() -> list[str]:
    """argv prefix that runs the tunnel CLI of the interpreter running the tests.

    ``python -m tunnel.cli`` would be the natural choice, but tunnel/cli.py's
    ``if __name__ == "__main__"`` block sits above the ``check``/``run`` commands, so
    ``python -m tunnel.cli run`` says "No such command 'run'". The console script
    beside ``sys.executable`` does not have that problem; fall back to ``-m`` only if
    it is missing.
    """
    script = Path(sys.executable).with_name("tunnel")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "tunnel.cli"]


@dataclass
class TunnelProcess:
    """A running ``tunnel run``: its process, YAML files, log and bound ports."""

    process: subprocess.Popen[bytes]
    files: list[Path]
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)  # tunnel name -> bound TCP port

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Wait until a log line matches the regex ``pattern``; return the match.

        Logging happens in the daemon, asynchronously to whatever the test did, so a
        test that expects a line must wait for it rather than read the log once.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match is not None:
                return match
            if self.process.poll() is not None or time.monotonic() >= deadline:
                raise AssertionError(
                    f"no log line matching {pattern!r} after {timeout:.1f}s\n--- {self.log_path} ---\n{self.log_text()}"
                )
            time.sleep(0.02)


def _tunnel_name(doc: dict[str, Any], index: int) -> str:
    name = doc.get("name")
    return name if isinstance(name, str) else f"tunnel{index}"


def _wait_ready(tunnel: TunnelProcess, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = tunnel.log_text()
        ready = _READY_RE.search(text)
        if ready is not None:
            if int(ready.group("count")) != count:
                raise TunnelProcessError(f"expected ready tunnels={count}\n--- log ---\n{text}")
            for match in _LISTENING_RE.finditer(text):
                _host, _, port = match.group("listen").rpartition(":")
                if port.isdigit():
                    tunnel.ports[match.group("name")] = int(port)
            return
        code = tunnel.process.poll()
        if code is not None:
            raise TunnelProcessError(f"tunnel run exited with status {code} before ready\n--- log ---\n{text}")
        if time.monotonic() >= deadline:
            raise TunnelProcessError(f"tunnel run not ready after {timeout:.1f}s\n--- log ---\n{text}")
        time.sleep(0.02)


def _terminate(process: subprocess.Popen[bytes], grace: float) -> bool:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL. True if it had to be killed."""
    if process.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        return True
    return False


@contextlib.contextmanager
def run_tunnel(tmp: Path, *docs: dict[str, Any], timeout: float = 15.0) -> Iterator[TunnelProcess]:
    """Run ``tunnel run`` on one YAML file per document (each names its tunnel, or gets
    ``tunnelN``); yield once the daemon logged ``ready``.

    On a normal exit: SIGTERM, up to 10 s to drain (then SIGKILL), and assert the exit
    status is 0. If the body raised, the daemon is stopped the same way but its status is
    not checked, so the original failure is the one reported.
    """
    if not docs:
        raise ValueError("run_tunnel needs at least one tunnel document")
    tmp.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for index, doc in enumerate(docs):
        document = {"name": _tunnel_name(doc, index), **doc}
        path = tmp / f"{document['name']}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        files.append(path)
    log_path = tmp / "tunnel.log"
    argv = [*tunnel_command(), "run", *map(str, files)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    tunnel = TunnelProcess(process=process, files=files, log_path=log_path)
    try:
        _wait_ready(tunnel, len(docs), timeout)
        yield tunnel
    except BaseException:
        _terminate(process, grace=10.0)
        raise
    killed = _terminate(process, grace=10.0)
    assert not killed, f"tunnel run ignored SIGTERM for 10 s\n--- log ---\n{tunnel.log_text()}"
    assert process.returncode == 0, (
        f"tunnel run exited with status {process.returncode} after SIGTERM\n--- log ---\n{tunnel.log_text()}"
    )


# --------------------------------------------------------------------------- documents


def server_doc(
    pki: PKI,
    *,
    name: str,
    port: int,
    target: str,
    allow_cn: list[str] | None = None,
) -> dict[str, Any]:
    """A server tunnel: TLS in on 127.0.0.1:port (server cert), plaintext out to target."""
    allow = {"cn": allow_cn if allow_cn is not None else ["app1"]}
    return helpers.server_doc(pki, target, listen=address(port), name=name, allow=allow, limits=dict(TEST_LIMITS))


def client_doc(pki: PKI, *, name: str, port: int, target: str, cert: str = "app1") -> dict[str, Any]:
    """A client tunnel: plaintext in on 127.0.0.1:port, TLS out to target as ``cert``."""
    doc = helpers.client_doc(pki, target, name=cert, listen=address(port), limits=dict(TEST_LIMITS))
    doc["name"] = name
    return doc


def address(port: int) -> str:
    return f"{LOCALHOST}:{port}"


# --------------------------------------------------------------------------- targets


class HashTarget:
    """A thread-based TCP server on 127.0.0.1: for each connection, read to EOF, then
    reply with the hex sha256 of everything received and close. Only a working
    half-close (EOF passed on while the reverse direction stays open) gets an answer.
    """

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOCALHOST, 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self.received: list[int] = []  # bytes received per finished connection
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="hash-target", daemon=True)

    @property
    def address(self) -> str:
        return address(self.port)

    def __enter__(self) -> HashTarget:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closing = True
        # Wake the acceptor with a throwaway connection, then close the listener.
        with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, self.port), timeout=1):
            pass
        self._acceptor.join(timeout=5)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            with self._lock:
                self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        total = 0
        with conn:
            conn.settimeout(20)
            try:
                while chunk := conn.recv(256 * 1024):
                    digest.update(chunk)
                    total += len(chunk)
                conn.sendall(digest.hexdigest().encode())
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                return
            finally:
                with self._lock:
                    self.received.append(total)


def send_and_hash(port: int, payload: bytes, timeout: float = 10.0) -> str:
    """Connect to 127.0.0.1:port, send ``payload``, half-close (SHUT_WR), and return
    everything that comes back before EOF, decoded."""
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks: list[bytes] = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


# --------------------------------------------------------------------------- redis


def big_value(size: int = MIB) -> bytes:
    """``size`` random printable bytes (no newline, so redis-cli passes them untouched)."""
    return secrets.token_hex(size // 2 + 1).encode()[:size]


def redis_set_from_stdin(port: int, key: str, value: bytes) -> str:
    """``redis-cli -x SET key`` with the value on stdin (an argv string is capped at 128 KiB)."""
    cli = require_tool("redis-cli")
    result = subprocess.run(
        [cli, "-h", LOCALHOST, "-p", str(port), "-x", "set", key],
        input=value,
        capture_output=True,
        timeout=30,
        check=True,
    )
    return result.stdout.decode(errors="replace").strip()


def redis_get_raw(port: int, key: str) -> bytes:
    cli = require_tool("redis-cli")
    result = subprocess.run(
        [cli, "-h", LOCALHOST, "-p", str(port), "--raw", "get", key],
        capture_output=True,
        timeout=30,
        check=True,
    )
    out = result.stdout
    assert out.endswith(b"\n"), out[-100:]
    return out[:-1]
