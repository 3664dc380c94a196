"""Issue 16's proof: under a load of new connections (at least 50 a second) and 20
long-lived streams carrying data, 10 hand-over upgrades (SIGUSR2) and then 10
socket-activated restarts (the test plays systemd: it holds the listening socket, stops
the daemon with SIGTERM and starts the next with the socket in LISTEN_FDS) refuse no
connect and break no stream, every byte checked; with one process and with --workers 2.

Between a restart's SIGTERM and the next daemon's start, connects queue in the kernel on
the socket the test holds; the old daemon drains its streams meanwhile (drain_timeout is
longer than the test), as a daemon does when systemd restarts it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_socket_activation import ACTIVATE
from tests.e2e.test_upgrade import (
    Connects,
    Pids,
    Stream,
    alive,
    assert_nothing_lost,
    children,
    edge,
    pids,
    read_pid,
    wait_until,
)
from tests.helpers import PKI
from tests.process import DaemonProcess, EchoTarget, echo_once

UPGRADES = 10
RESTARTS = 10
STREAMS = 20

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]
__all__ = ["pids"]  # a fixture, from test_upgrade


def _start(tmp: Path, listening: socket.socket, path: Path, pidfile: Path, workers: int) -> DaemonProcess:
    """`tunnel run` with `listening` passed as systemd passes it (descriptor 3)."""
    wrapper = [sys.executable, "-c", ACTIVATE, str(listening.fileno()), "self", "edge"]
    extra = ["--workers", str(workers)] if workers else []
    daemon = DaemonProcess(
        tmp, *extra, "--pidfile", str(pidfile), str(path), wrapper=wrapper, pass_fds=[listening.fileno()]
    )
    daemon.wait_for(f"ready workers={workers}" if workers else "ready tunnels=1", timeout=30)
    return daemon


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers-2"])
def test_upgrades_and_socket_activated_restarts_refuse_no_connect_and_break_no_stream(
    pki_files: PKI,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    target: EchoTarget,
    pids: Pids,
    workers: int,
) -> None:
    listening = socket.create_server(("127.0.0.1", 0), backlog=4096)  # the socket unit's
    port = listening.getsockname()[1]
    path = edge(pki_files, tmp_path, target, f"127.0.0.1:{port}")
    pidfile = tmp_path / "tunnel.pid"

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=30)

    try:
        daemon = _start(tmp_path, listening, path, pidfile, workers)
        daemons.append(daemon)
        wait_until(lambda: read_pid(pidfile) is not None, "the pidfile is written")
        pid = read_pid(pidfile)
        assert pid is not None
        pids.seen.append(pid)
        load = Connects(pki_files, connect)
        streams = [Stream(pki_files, connect()) for _ in range(STREAMS)]
        retired: list[int] = []
        try:
            time.sleep(0.5)
            for round_ in range(UPGRADES):
                before = children(pid) if workers else []
                os.kill(pid, signal.SIGUSR2)
                wait_until(lambda old=pid: read_pid(pidfile) not in (None, old), f"upgrade {round_ + 1}", 40)
                retired += [pid, *before]
                pid = read_pid(pidfile)
                assert pid is not None
                pids.seen.append(pid)
                time.sleep(0.5)
            for round_ in range(RESTARTS):
                before = children(pid) if workers else []
                os.kill(pid, signal.SIGTERM)  # systemctl restart: the old one stops accepting, drains
                retired += [pid, *before]
                time.sleep(0.2)  # connects meanwhile queue on the socket systemd (the test) holds
                pidfile.unlink(missing_ok=True)
                daemon = _start(tmp_path, listening, path, pidfile, workers)
                daemons.append(daemon)
                wait_until(lambda: read_pid(pidfile) is not None, f"restart {round_ + 1}: the new pidfile")
                pid = read_pid(pidfile)
                assert pid is not None
                pids.seen.append(pid)
                time.sleep(0.5)
            assert [s.error for s in streams] == [None] * STREAMS
        finally:
            rate = load.stop()
            for stream in streams:
                stream.close()
        assert len(streams) == STREAMS
        assert_nothing_lost(load, streams, rate)
        assert load.ok > (UPGRADES + RESTARTS) * 20
        # Their streams closed, every retired process has drained and exited.
        wait_until(lambda: not any(alive(each) for each in retired), f"retired processes {retired} exit", 60)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), "the last daemon stops")
    finally:
        listening.close()


def test_a_session_resumes_after_a_hand_over_upgrade(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, pids: Pids
) -> None:
    """The old process passes the new one the secret its session-ticket keys derive from:
    a client's session from before the upgrade resumes after it (no full handshake)."""
    listening = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = listening.getsockname()[1]
    pidfile = tmp_path / "tunnel.pid"
    try:
        daemon = _start(tmp_path, listening, edge(pki_files, tmp_path, target, f"127.0.0.1:{port}"), pidfile, 0)
        daemons.append(daemon)
        wait_until(lambda: read_pid(pidfile) is not None, "the pidfile is written")
        old = read_pid(pidfile)
        assert old is not None
        pids.seen.append(old)
        context = pki_files.client_context("app1")
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # the session is there at once (1.3: after a read)
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            assert echo_once(tls, b"before") == b"before"
            session = tls.session
        assert session is not None
        os.kill(old, signal.SIGUSR2)
        wait_until(lambda: read_pid(pidfile) not in (None, old), "the upgrade")
        new = read_pid(pidfile)
        assert new is not None
        pids.seen.append(new)
        wait_until(lambda: not alive(old), "the old process exits")  # only the new one accepts now
        raw = socket.create_connection(("127.0.0.1", port))
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            assert echo_once(tls, b"after") == b"after"
            assert tls.session_reused
        os.kill(new, signal.SIGTERM)
        wait_until(lambda: not alive(new), "the daemon stops")
    finally:
        listening.close()
