"""The real `tunnel run` as a subprocess, plus a threaded echo target, for e2e tests."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import PKI

TUNNEL = [sys.executable, "-m", "tunnel.cli"]


class DaemonProcess:
    """`tunnel run ARGS...` with stderr captured to a file; log lines can be awaited."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        watch_interval: float = 0.2,
        wrapper: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`wrapper`: a command that execs the rest of its arguments (plays systemd's part
        in tests/e2e/test_socket_activation.py); `pass_fds`: descriptors it inherits;
        `env`: variables added to ours."""
        self.log_path = tmp / f"tunnel-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*wrapper, *TUNNEL, "run", f"--watch-interval={watch_interval}", *args],
            stderr=self._log,
            pass_fds=pass_fds,
            env=None if env is None else {**os.environ, **env},
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, *, count: int = 1, timeout: float = 10.0) -> str:
        """Wait until `text` appears `count` times in the log; return the log."""
        deadline = time.monotonic() + timeout
        while True:
            content = self.log()
            if content.count(text) >= count:
                return content
            if self.process.poll() is not None:
                raise AssertionError(f"tunnel exited {self.process.returncode} waiting for {text!r}:\n{content}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} (x{count}) not logged within {timeout}s:\n{content}")
            time.sleep(0.02)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def wait_for_fds(self, expected: int, timeout: float = 10.0) -> None:
        """Wait until the daemon holds `expected` file descriptors (its baseline)."""
        deadline = time.monotonic() + timeout
        while (now := self.open_fds()) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon holds {now} fds, baseline {expected}:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def reload(self) -> str:
        """SIGHUP and wait for the reload's outcome (success or failure) to be logged."""
        done = self.log().count("reloaded tunnels=") + self.log().count("reload failed")
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log().count("reloaded tunnels=") + self.log().count("reload failed") <= done:
            if time.monotonic() > deadline:
                raise AssertionError("no reload outcome logged:\n" + self.log())
            time.sleep(0.02)
        return self.log()

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


class EchoTarget:
    """A threaded TCP echo server on 127.0.0.1 that counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.active = 0
        self.max_active = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):  # until the tunnel closes its side
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                self.active -= 1

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                conn.close()


def tls_client(p: PKI, port: int, name: str, *, timeout: float = 5.0, source: str | None = None) -> ssl.SSLSocket:
    """A blocking stdlib TLS client presenting `name`'s certificate, connecting from
    `source` (another loopback address, e.g. 127.0.0.2: another source to the tunnel)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None)
    try:
        return p.client_context(name).wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def echo_once(sock: ssl.SSLSocket | socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def is_closed(sock: ssl.SSLSocket | socket.socket) -> bool:
    """True when the peer has ended the connection (EOF, reset or a TLS alert)."""
    try:
        sock.sendall(b"?")
        return sock.recv(100) == b""
    except (OSError, ssl.SSLError):
        return True


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
