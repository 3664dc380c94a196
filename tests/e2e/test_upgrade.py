"""The hand-over upgrade (SIGUSR2, `tunnel upgrade`): under a stream of new TLS
connections and long-lived streams, a daemon is replaced by a new process again and
again without refusing a connect, resetting a connection or losing a byte (issue 16)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PKI, free_port, server_doc, write_yaml
from tests.process import TUNNEL, DaemonProcess, EchoTarget, echo_once

UPGRADES = 5


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, left for its new parent to reap, has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    found: list[int] = []
    with_tasks = Path(f"/proc/{pid}/task")
    if with_tasks.exists():
        for task in with_tasks.iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def wait_until(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


class Pids:
    """Every pid a test saw serve (killed at the end: they are not the test's children)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def kill_all(self) -> None:
        for pid in self.seen:
            for each in [*children(pid), pid] if alive(pid) else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signal.SIGKILL)


@pytest.fixture
def pids() -> Iterator[Pids]:
    seen = Pids()
    yield seen
    seen.kill_all()


class Connects:
    """New TLS connections, one after another from each of `threads` threads (at least 50
    a second in all), each sending a numbered payload and checking its echo. Counts what
    succeeded, what was refused and what broke (reset, TLS error, short or wrong echo)."""

    def __init__(self, p: PKI, connect: Any, threads: int = 3) -> None:
        self.p = p
        self.connect = connect  # () -> a connected plain socket
        self.ok = 0
        self.refused: list[str] = []
        self.broken: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        n = 0
        context = self.p.client_context("app1")
        while not self._stop.is_set():
            n += 1
            payload = f"{index}:{n}:".encode() * 50
            try:
                raw = self.connect()
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                with self._lock:
                    self.refused.append(repr(exc))
                continue
            try:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    got = echo_once(tls, payload)
                outcome = "ok" if got == payload else f"echo {len(got)}/{len(payload)} bytes"
            except (OSError, ssl.SSLError) as exc:
                outcome = repr(exc)
            finally:
                raw.close()
            with self._lock:
                if outcome == "ok":
                    self.ok += 1
                else:
                    self.broken.append(outcome)
            time.sleep(0.01)

    def stop(self) -> float:
        """Stop; the rate achieved (connections a second)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.ok / (time.monotonic() - self.started)


class Stream:
    """A long-lived TLS connection carrying numbered chunks both ways, each one checked."""

    def __init__(self, p: PKI, raw: socket.socket) -> None:
        self.tls = p.client_context("app1").wrap_socket(raw, server_hostname="localhost")
        self.sent = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                chunk = f"[{n:08d}]".encode() * 100
                if echo_once(self.tls, chunk) != chunk:
                    self.error = f"chunk {n} not echoed whole"
                    return
                self.sent += len(chunk)
                time.sleep(0.02)
        except (OSError, ssl.SSLError) as exc:
            self.error = repr(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.tls.close()


def upgrade_under_load(
    p: PKI, tmp: Path, daemon: DaemonProcess, pidfile: Path, pids: Pids, connect: Any, *, workers: int = 0
) -> None:
    """UPGRADES upgrades by SIGUSR2 while Connects and Streams run; checks everything."""
    wait_until(lambda: read_pid(pidfile) is not None, "the pidfile is written")
    pid = read_pid(pidfile)
    assert pid == daemon.process.pid
    pids.seen.append(pid)
    load = Connects(p, connect)
    streams = [Stream(p, connect()) for _ in range(2)]
    old: list[int] = []
    try:
        time.sleep(0.5)
        for round_ in range(UPGRADES):
            assert pid is not None
            before = [*children(pid)] if workers else []
            assert len(before) == workers
            os.kill(pid, signal.SIGUSR2)
            wait_until(lambda old=pid: read_pid(pidfile) not in (None, old), f"upgrade {round_ + 1}: a new pid", 40)
            new = read_pid(pidfile)
            assert new is not None
            assert alive(new)
            old += [pid, *before]
            pids.seen.append(new)
            pid = new
            streams.append(Stream(p, connect()))  # one more for the new process to carry
            time.sleep(1.0)  # connects go on, to the new process now
        # Every old process still carries long-lived streams: none has broken.
        assert [s.error for s in streams] == [None] * len(streams)
    finally:
        rate = load.stop()
        for stream in streams:
            stream.close()
    assert_nothing_lost(load, streams, rate)
    # With their streams closed, the old processes have drained and exited.
    wait_until(lambda: not any(alive(each) for each in old), f"old processes {old} exit")
    log = daemon.log()
    assert log.count("upgraded: pid") == UPGRADES
    assert "upgrade_failed" not in log
    assert "upgrade failed" not in log
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), "the last process stops")
    assert not pidfile.exists(), "the last process removes its pidfile"


def assert_nothing_lost(load: Connects, streams: list[Stream], rate: float) -> None:
    """The verdict on a load carried through upgrades or restarts: no connect refused or
    broken, every long-lived stream whole and carrying data, at least 50 connects a second."""
    assert load.refused == [], f"{len(load.refused)} refused: {load.refused[:5]}"
    assert load.broken == [], f"{len(load.broken)} broken: {load.broken[:5]}"
    assert [s.error for s in streams] == [None] * len(streams)
    assert all(s.sent > 0 for s in streams)
    assert rate >= 50, f"only {rate:.0f} connections a second"


def tcp_connect(port: int) -> Any:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=10)


def edge(p: PKI, tmp: Path, target: EchoTarget, listen: str) -> Path:
    doc = server_doc(p, target.address, listen=listen)
    doc["allow"] = {"cn": ["app1"]}
    doc["limits"].update({"drain_timeout": "60s", "per_source": {"connections": 256, "handshakes": 32}})
    return write_yaml(tmp / "edge.yaml", doc)


def start_edge(
    p: PKI, tmp: Path, target: EchoTarget, daemons: list[DaemonProcess], listen: str, *args: str, **kw: Any
) -> tuple[DaemonProcess, Path, Path]:
    """`tunnel run --pidfile PIDFILE [ARGS] edge.yaml` for the edge tunnel on `listen`,
    registered for clean-up: (the daemon, its tunnel file, its pidfile). Not yet ready."""
    pidfile = tmp / "tunnel.pid"
    path = edge(p, tmp, target, listen)
    daemon = DaemonProcess(tmp, *args, "--pidfile", str(pidfile), str(path), **kw)
    daemons.append(daemon)
    return daemon, path, pidfile


def test_upgrades_under_load_refuse_reset_and_lose_nothing(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, pids: Pids
) -> None:
    port = free_port()
    daemon, _, pidfile = start_edge(pki_files, tmp_path, target, daemons, f"127.0.0.1:{port}")
    daemon.wait_for("ready tunnels=1")
    upgrade_under_load(pki_files, tmp_path, daemon, pidfile, pids, tcp_connect(port))


def test_upgrades_of_a_supervisor_and_its_workers_under_load_lose_nothing(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, pids: Pids
) -> None:
    port, status = free_port(), free_port()
    workers = ("--workers", "2", "--status", f"127.0.0.1:{status}")
    daemon, _, pidfile = start_edge(pki_files, tmp_path, target, daemons, f"127.0.0.1:{port}", *workers)
    daemon.wait_for("ready workers=2", timeout=20)
    upgrade_under_load(pki_files, tmp_path, daemon, pidfile, pids, tcp_connect(port), workers=2)


def test_a_unix_listener_is_handed_over_and_its_file_kept(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, pids: Pids
) -> None:
    sock_path = tmp_path / "edge.sock"
    daemon, _, pidfile = start_edge(pki_files, tmp_path, target, daemons, f"unix:{sock_path}")
    daemon.wait_for("ready tunnels=1")
    inode = sock_path.stat().st_ino

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(sock_path))
        except OSError:
            sock.close()
            raise
        return sock

    wait_until(lambda: read_pid(pidfile) is not None, "the pidfile is written")
    first = read_pid(pidfile)
    assert first is not None
    pids.seen.append(first)
    load = Connects(pki_files, connect)
    try:
        time.sleep(0.5)
        os.kill(first, signal.SIGUSR2)
        wait_until(lambda: read_pid(pidfile) not in (None, first), "a new pid", 40)
        new = read_pid(pidfile)
        assert new is not None
        pids.seen.append(new)
        wait_until(lambda: not alive(first), "the old process exits")
        time.sleep(0.5)
        assert sock_path.stat().st_ino == inode, "the old process left the socket file in place"
    finally:
        load.stop()
    assert load.refused == []
    assert load.broken == []
    assert load.ok > 0
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not alive(new), "the new process stops")
    assert not sock_path.exists(), "the process that took the socket over removes its file at the end"


def test_a_new_process_that_fails_leaves_the_old_one_serving(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, pids: Pids
) -> None:
    port = free_port()
    daemon, path, pidfile = start_edge(pki_files, tmp_path, target, daemons, f"127.0.0.1:{port}", watch_interval=0)
    daemon.wait_for("ready tunnels=1")
    good = path.read_text()
    path.write_text(good.replace("mode: server", "mode: sideways"))
    result = subprocess.run([*TUNNEL, "upgrade", str(pidfile), "--timeout", "5"], capture_output=True, text=True)
    assert result.returncode == 1, result
    log = daemon.wait_for("upgrade failed, still serving: the new process exited with status 2")
    assert "mode" in log  # the new process said why on the same stderr
    assert daemon.process.poll() is None
    assert read_pid(pidfile) == daemon.process.pid
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pki_files.client_context("app1").wrap_socket(raw, server_hostname="localhost") as tls:
            assert echo_once(tls, b"still here") == b"still here"
    # Fixed: the next upgrade goes through.
    path.write_text(good)
    result = subprocess.run([*TUNNEL, "upgrade", str(pidfile)], capture_output=True, text=True)
    assert result.returncode == 0, result
    new = read_pid(pidfile)
    assert new is not None
    assert new != daemon.process.pid
    pids.seen.append(new)
    assert result.stdout.strip() == f"upgraded: pid {daemon.process.pid} -> {new}"
    assert daemon.process.wait(timeout=10) == 0


def test_a_second_sigusr2_during_an_upgrade_is_ignored(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, pids: Pids
) -> None:
    port = free_port()
    daemon, _, pidfile = start_edge(pki_files, tmp_path, target, daemons, f"127.0.0.1:{port}")
    daemon.wait_for("ready tunnels=1")
    daemon.signal(signal.SIGUSR2)
    daemon.wait_for("upgrading on SIGUSR2")
    daemon.signal(signal.SIGUSR2)  # while the new process starts (it takes a few hundred ms)
    daemon.wait_for("SIGUSR2 ignored: an upgrade is under way")
    wait_until(lambda: read_pid(pidfile) not in (None, daemon.process.pid), "a new pid")
    pids.seen.append(read_pid(pidfile) or 0)
    assert daemon.process.wait(timeout=10) == 0
    log = daemon.log()
    assert log.count("upgrading on SIGUSR2") == 1
    assert log.count("upgraded: pid") == 1


def test_the_new_process_tells_systemd_it_is_the_main_process(
    pki_files: PKI,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    target: EchoTarget,
    pids: Pids,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A test plays systemd: a NOTIFY_SOCKET datagram socket it reads."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    port = free_port()
    daemon, _, pidfile = start_edge(pki_files, tmp_path, target, daemons, f"127.0.0.1:{port}")
    try:
        assert notify.recv(4096).split(b"\n")[0] == b"READY=1"
        daemon.signal(signal.SIGUSR2)
        message = notify.recv(4096).decode().split("\n")
        wait_until(lambda: read_pid(pidfile) not in (None, daemon.process.pid), "a new pid")
        new = read_pid(pidfile)
        pids.seen.append(new or 0)
        assert message[:2] == [f"MAINPID={new}", "READY=1"]
        assert daemon.process.wait(timeout=10) == 0
        notify.settimeout(0.5)
        later = []
        try:
            while True:
                later.append(notify.recv(4096))
        except TimeoutError:
            pass
        assert not any(b"STOPPING=1" in m for m in later), "the old process must not say the service stops"
    finally:
        notify.close()


def test_a_status_address_the_new_configuration_dropped_is_closed_not_left_hanging(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget, pids: Pids
) -> None:
    """The old process hands over its status sockets too. One for a status address the
    new configuration no longer has was kept open and never served: a client's connect
    succeeded and its request waited forever (found in review). Now it is closed."""
    port, status = free_port(), free_port()
    pidfile = tmp_path / "tunnel.pid"
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}", status=f"127.0.0.1:{status}")
    path = write_yaml(tmp_path / "edge.yaml", doc)
    daemon = DaemonProcess(tmp_path, "--pidfile", str(pidfile), str(path), watch_interval=0)
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    del doc["status"]
    write_yaml(path, doc)
    daemon.signal(signal.SIGUSR2)
    wait_until(lambda: read_pid(pidfile) not in (None, daemon.process.pid), "a new pid")
    new = read_pid(pidfile)
    assert new is not None
    pids.seen.append(new)
    assert daemon.process.wait(timeout=10) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", status), timeout=2).close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # the tunnel goes on
        with pki_files.client_context("app1").wrap_socket(raw, server_hostname="localhost") as tls:
            assert echo_once(tls, b"still") == b"still"
