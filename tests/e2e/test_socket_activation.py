"""systemd socket activation: `tunnel run` serves the listening sockets passed in
LISTEN_FDS / LISTEN_FDNAMES (sd_listen_fds(3)). The test plays systemd's part: it binds
the socket, keeps it open (as systemd does) and starts the daemon through a wrapper that
puts the socket on descriptor 3, sets LISTEN_PID to its own pid and execs `tunnel run`."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_workers import children, connections
from tests.helpers import PKI, free_port, server_doc, write_yaml
from tests.process import DaemonProcess, EchoTarget, echo_once, tls_client

# sys.argv: FDS (comma-separated, in the order to pass them), LISTEN_PID ("self": the
# wrapper's own pid, which exec keeps), LISTEN_FDNAMES ("-": unset), then the command.
ACTIVATE = r"""
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)  # inheritable, as systemd passes them: 3, 4, ...
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else sys.argv[2]
if sys.argv[3] != "-":
    os.environ["LISTEN_FDNAMES"] = sys.argv[3]
os.execvp(sys.argv[4], sys.argv[4:])
"""

VARIABLES = (b"LISTEN_PID=", b"LISTEN_FDS=", b"LISTEN_FDNAMES=")


def activated(
    tmp: Path,
    sockets: list[socket.socket],
    *args: str,
    names: str = "-",
    listen_pid: str = "self",
    daemons: list[DaemonProcess],
) -> DaemonProcess:
    """`tunnel run ARGS` with `sockets` passed as systemd passes them."""
    fds = [sock.fileno() for sock in sockets]
    wrapper = [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), listen_pid, names]
    daemon = DaemonProcess(tmp, *args, wrapper=wrapper, pass_fds=fds)
    daemons.append(daemon)
    return daemon


@pytest.fixture
def systemd_socket() -> Iterator[socket.socket]:
    """A listening TCP socket on 127.0.0.1, as a socket unit's ListenStream= makes it."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    yield sock
    sock.close()


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def edge(p: PKI, tmp: Path, target: EchoTarget, *, listen: str = "127.0.0.1:0", name: str = "edge") -> Path:
    doc = server_doc(p, target.address, listen=listen)
    doc["limits"]["drain_timeout"] = "2s"
    return write_yaml(tmp / f"{name}.yaml", doc)


def round_trip(p: PKI, port: int, data: bytes = b"through systemd's socket\n") -> None:
    with tls_client(p, port, "app1") as conn:
        assert echo_once(conn, data) == data


def test_the_socket_named_after_a_tunnel_is_served_instead_of_its_listen_address(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, systemd_socket: socket.socket
) -> None:
    config = edge(pki_files, tmp_path, target)  # listen 127.0.0.1:0: only the name matches
    daemon = activated(tmp_path, [systemd_socket], str(config), names="edge", daemons=daemons)
    log = daemon.wait_for("listening tunnel=edge")
    assert f"listen=127.0.0.1:{port_of(systemd_socket)}" in log
    assert 'serves the socket passed by the service manager: fd 3 (name "edge"' in log
    round_trip(pki_files, port_of(systemd_socket))
    flags = int(Path(f"/proc/{daemon.process.pid}/fdinfo/3").read_text().split("flags:")[1].split()[0], 8)
    assert flags & os.O_CLOEXEC, "a passed descriptor gets FD_CLOEXEC"
    assert daemon.stop() == 0


def test_an_unnamed_socket_is_matched_by_its_address(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, systemd_socket: socket.socket
) -> None:
    config = edge(pki_files, tmp_path, target, listen=f"127.0.0.1:{port_of(systemd_socket)}")
    # systemd's default name is the socket unit's: it names no tunnel, the address does.
    daemon = activated(tmp_path, [systemd_socket], str(config), names="tunnel@edge.socket", daemons=daemons)
    daemon.wait_for("listening tunnel=edge")
    round_trip(pki_files, port_of(systemd_socket))
    assert daemon.stop() == 0


def test_a_connect_while_no_daemon_runs_is_queued_and_served_by_the_next_daemon(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, systemd_socket: socket.socket
) -> None:
    config = edge(pki_files, tmp_path, target, listen=f"127.0.0.1:{port_of(systemd_socket)}")
    port = port_of(systemd_socket)
    first = activated(tmp_path, [systemd_socket], str(config), names="edge", daemons=daemons)
    first.wait_for("listening tunnel=edge")
    round_trip(pki_files, port, b"before the restart\n")
    assert first.stop() == 0  # SIGTERM: the daemon is gone, the socket (systemd's) is not

    # A client arrives while no daemon runs: the kernel completes its TCP handshake into
    # the socket's backlog (no ECONNREFUSED), and its ClientHello waits there too.
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    result: dict[str, object] = {}

    def client() -> None:
        try:
            with pki_files.client_context("app1").wrap_socket(raw, server_hostname="localhost") as conn:
                result["echo"] = echo_once(conn, b"queued across the restart\n")
        except (OSError, ssl.SSLError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), "nobody accepts until the next daemon starts"
    assert not result
    second = activated(tmp_path, [systemd_socket], str(config), names="edge", daemons=daemons)
    thread.join(timeout=20)
    assert result == {"echo": b"queued across the restart\n"}
    second.wait_for("listening tunnel=edge")
    assert second.stop() == 0


def test_a_passed_socket_no_tunnel_claims_is_an_error(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, systemd_socket: socket.socket
) -> None:
    config = edge(pki_files, tmp_path, target)
    with socket.create_server(("127.0.0.1", 0)) as stray:
        daemon = activated(tmp_path, [systemd_socket, stray], str(config), names="edge:stray", daemons=daemons)
        assert daemon.process.wait(timeout=20) == 2
        log = daemon.log()
        assert (
            f'error: LISTEN_FDS passed fd 4 (name "stray", address 127.0.0.1:{port_of(stray)}), which no tunnel claims'
            in log
        )
        assert "listening tunnel=" not in log


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(socket.SOCK_STREAM, "which is not listening"), (socket.SOCK_DGRAM, "which is not a stream socket")],
    ids=["bound-not-listening", "datagram"],
)
def test_a_passed_socket_that_is_not_a_listening_stream_socket_is_an_error(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, kind: int, expected: str
) -> None:
    config = edge(pki_files, tmp_path, target)
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        daemon = activated(tmp_path, [sock], str(config), names="edge", daemons=daemons)
        assert daemon.process.wait(timeout=20) == 2
        log = daemon.log()
        assert f'error: LISTEN_FDS passed fd 3 (name "edge", address 127.0.0.1:{port_of(sock)}), {expected}' in log


def test_workers_share_the_passed_socket_and_never_see_the_variables(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, systemd_socket: socket.socket
) -> None:
    port = port_of(systemd_socket)
    edge(pki_files, tmp_path, target, listen=f"127.0.0.1:{port}")
    # A unix: listener cannot be shared by workers that bind it, but a passed one is shared as it is.
    path = tmp_path / "local.sock"
    local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    local.bind(str(path))
    local.listen(128)
    edge(pki_files, tmp_path, target, listen=f"unix:{path}", name="local")
    status = free_port()
    daemon = activated(
        tmp_path,
        [systemd_socket, local],
        "--workers=2",
        f"--status=127.0.0.1:{status}",
        str(tmp_path),
        names="edge:unknown",
        daemons=daemons,
    )
    try:
        daemon.wait_for("ready workers=2", timeout=30)
        workers = children(daemon.process.pid)
        assert len(workers) == 2
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(VARIABLES)], "the variables are unset before any child"
        held = [tls_client(pki_files, port, "app1") for _ in range(8)]
        for conn in held:
            assert echo_once(conn, b"w" * 10) == b"w" * 10
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(str(path))
            with pki_files.client_context("app1").wrap_socket(raw, server_hostname="localhost") as conn:
                assert echo_once(conn, b"over unix\n") == b"over unix\n"
        assert len([row for row in connections(status) if row["tunnel"] == "edge"]) == 8
        for conn in held:
            conn.close()
        assert daemon.stop() == 0
        assert path.exists(), "a passed unix socket is systemd's: never unlinked"
    finally:
        local.close()


def test_the_variables_of_another_process_are_ignored_and_unset(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, systemd_socket: socket.socket
) -> None:
    own = free_port()
    config = edge(pki_files, tmp_path, target, listen=f"127.0.0.1:{own}")
    daemon = activated(
        tmp_path, [systemd_socket], "--workers=2", str(config), names="edge", listen_pid="1", daemons=daemons
    )
    log = daemon.wait_for("ready workers=2", timeout=30)
    assert "serves the socket passed" not in log
    round_trip(pki_files, own)  # its own listen address, bound as without systemd
    for pid in children(daemon.process.pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(VARIABLES)], "unset even when meant for another process"
    assert daemon.stop() == 0


def test_a_passed_unix_socket_keeps_its_mode_across_a_reload_and_its_file_at_exit(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    path = tmp_path / "edge.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(0o666)  # SocketMode=0666, systemd's default
    sock.listen(16)
    try:
        config = edge(pki_files, tmp_path, target, listen=f"unix:{path}")  # unix.mode: 0600 by default
        daemon = activated(tmp_path, [sock], str(config), daemons=daemons)  # no names: by address
        daemon.wait_for("listening tunnel=edge")
        assert "reloaded tunnels=1" in daemon.reload()
        assert path.stat().st_mode & 0o777 == 0o666, "the socket unit's SocketMode= rules a passed socket"
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(str(path))
            with pki_files.client_context("app1").wrap_socket(raw, server_hostname="localhost") as conn:
                assert echo_once(conn, b"over unix\n") == b"over unix\n"
        assert daemon.stop() == 0
        assert path.exists(), "a passed unix socket is never unlinked"
    finally:
        sock.close()


def test_a_tunnel_removed_by_reload_leaves_its_socket_open_for_a_later_reload(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, systemd_socket: socket.socket
) -> None:
    port = port_of(systemd_socket)
    directory = tmp_path / "etc"
    directory.mkdir()
    config = edge(pki_files, directory, target, listen=f"127.0.0.1:{port}")
    edge(pki_files, directory, target, name="other")
    daemon = activated(tmp_path, [systemd_socket], str(directory), names="edge", daemons=daemons)
    daemon.wait_for("listening tunnel=edge")
    kept = tmp_path / "edge.yaml"
    shutil.move(config, kept)
    assert "reloaded tunnels=1" in daemon.reload()
    daemon.wait_for("tunnel edge is no longer configured")
    # Nobody serves the address now, but it stays open: a connect waits in its queue...
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    shutil.move(kept, config)
    assert "reloaded tunnels=2" in daemon.reload()
    # ...and the tunnel brought back by the next reload serves the same socket again.
    with pki_files.client_context("app1").wrap_socket(raw, server_hostname="localhost") as conn:
        assert echo_once(conn, b"after the reload\n") == b"after the reload\n"
    round_trip(pki_files, port)
    assert daemon.stop() == 0
