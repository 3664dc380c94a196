"""`tunnel run` raises its file descriptor limit (RLIMIT_NOFILE) to what its connections
need, and says so when the hard limit is short: real processes started under prlimit(1)."""

from __future__ import annotations

import contextlib
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


def test_a_hard_limit_short_of_max_connections_is_logged(pki_files: PKI, tmp_path: Path) -> None:
    """A hard limit of 256 cannot hold limits.max_connections: 1024 (2 descriptors each): the
    log says so at start, with the numbers and how to raise it; the tunnel still serves."""
    target = EchoTarget()
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    daemon = DaemonProcess(tmp_path, str(write_yaml(tmp_path / "s.yaml", doc)), wrapper=["prlimit", "--nofile=256:256"])
    try:
        log = daemon.wait_for("ready tunnels=1")
        assert (
            "file descriptor limit 256 (hard limit 256) is below the 2112 that limits.max_connections needs "
            "(2 per connection): connections past about 96 wait for a free descriptor; "
            "raise it with LimitNOFILE= (systemd) or ulimit -n"
        ) in log
        with tls_client(pki_files, port, "app1", timeout=10) as client:
            assert echo_once(client, b"still serving") == b"still serving"
    finally:
        daemon.stop()
        target.close()
