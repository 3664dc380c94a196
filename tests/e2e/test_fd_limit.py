"""`tunnel run` raises its file descriptor limit (RLIMIT_NOFILE) to what its connections
need, and says so when the hard limit is short: real processes started under prlimit(1)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import PKI, free_port, server_doc, write_yaml
from tests.process import DaemonProcess, EchoTarget, echo_once, tls_client


def _limits(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_a_tunnel_started_with_a_low_soft_limit_serves_past_it(pki_files: PKI, tmp_path: Path) -> None:
    """Started with a soft limit of 128 descriptors (hard 4096), a server tunnel holds 150
    connections (300 descriptors): it raised its soft limit to the hard one. Before, it
    ran out at 128: the 60th connection was closed, its dial failing with EMFILE."""
    target = EchoTarget()
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    tunnel_file = str(write_yaml(tmp_path / "s.yaml", doc))
    daemon = DaemonProcess(tmp_path, tunnel_file, wrapper=["prlimit", "--nofile=128:4096"])
    clients = []
    try:
        daemon.wait_for("ready tunnels=1")
        assert _limits(daemon.process.pid) == (4096, 4096)
        for i in range(150):
            client = tls_client(pki_files, port, "app1", timeout=10)
            clients.append(client)
            assert echo_once(client, f"{i}".encode()) == f"{i}".encode(), f"connection {i}"
        assert target.active == 150
        assert "file descriptor limit" not in daemon.log()
    finally:
        for client in clients:
            with contextlib.suppress(OSError):
                client.close()
        daemon.stop()
        target.close()


def test_past_a_short_hard_limit_connections_wait_instead_of_failing(pki_files: PKI, tmp_path: Path) -> None:
    """A hard limit of 256 descriptors cannot hold limits.max_connections: 1024 (2 each): the
    tunnel lowers its cap to what fits (95) and says so; the 96th to 130th clients wait in
    the backlog and are served as earlier ones leave. Before, the tunnel accepted them and
    closed one at about 120 when its dial to the target failed with EMFILE."""
    target = EchoTarget()
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    tunnel_file = str(write_yaml(tmp_path / "s.yaml", doc))
    daemon = DaemonProcess(tmp_path, tunnel_file, wrapper=["prlimit", "--nofile=256:256"])
    total, fits = 130, 95
    served: list[int] = []
    failed: list[str] = []
    leave = [threading.Event() for _ in range(total)]
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            with tls_client(pki_files, port, "app1", timeout=30) as sock:
                got = echo_once(sock, f"{i}".encode())
                with lock:
                    if got == f"{i}".encode():
                        served.append(i)
                    else:
                        failed.append(f"{i}: closed" if not got else f"{i}: wrong echo")
                leave[i].wait(30)
        except OSError as exc:
            with lock:
                failed.append(f"{i}: {exc}")

    try:
        log = daemon.wait_for("ready tunnels=1")
        assert (
            "file descriptor limit 256 (hard limit 256) is below the 2113 that limits.max_connections needs "
            "(2 per connection): max_connections lowered to fit (s 95); raise the limit with LimitNOFILE= "
            "(systemd) or ulimit -Hn"
        ) in log
        with ThreadPoolExecutor(total) as pool:
            for i in range(total):
                pool.submit(client, i)
            _wait(lambda: len(served) + len(failed) >= fits)
            time.sleep(0.5)
            assert (len(served), failed) == (fits, []), "the cap that fits is served, the rest wait"
            for i in list(served)[: total - fits]:
                leave[i].set()
            _wait(lambda: len(served) + len(failed) >= total)
            assert failed == []
            for event in leave:
                event.set()
    finally:
        for event in leave:
            event.set()
        daemon.stop()
        target.close()


def _wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
