"""`tunnel run --workers N`: N processes share each listener; readiness, reload, drain,
status and metrics work across them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.test_operations import metric
from tests.helpers import PKI, free_port, make_pki, server_doc, write_yaml
from tests.process import TUNNEL, DaemonProcess, EchoTarget, echo_once, is_closed, tls_client
from tunnel import pki
from tunnel.ticket_keys import create_secret, pass_secret


def get_json(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def connections(port: int) -> list[dict[str, object]]:
    rows = get_json(port, "/connections")["connections"]
    assert isinstance(rows, list)
    return rows


def children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return sorted(found)


def start(
    p: PKI, tmp: Path, daemons: list[DaemonProcess], target: EchoTarget, workers: int = 2
) -> tuple[DaemonProcess, int, int]:
    port, status = free_port(), free_port()
    doc = server_doc(p, target.address, listen=f"127.0.0.1:{port}")
    doc["tls"]["crl"] = str(p.dir / "crl.pem")
    doc["allow"] = {"cn": ["app1", "app2"]}
    doc["limits"]["drain_timeout"] = "5s"
    path = write_yaml(tmp / "edge.yaml", doc)
    daemon = DaemonProcess(tmp, "--workers", str(workers), "--status", f"127.0.0.1:{status}", str(path))
    daemons.append(daemon)
    daemon.wait_for(f"ready workers={workers}", timeout=20)
    return daemon, port, status


def test_workers_share_the_listener_and_status_sums_them(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, status = start(pki_files, tmp_path, daemons, target)
    assert len(children(daemon.process.pid)) == 2
    held = [tls_client(pki_files, port, "app1") for _ in range(24)]
    try:
        for conn in held:
            assert echo_once(conn, b"w" * 100) == b"w" * 100
        rows = connections(status)
        assert len(rows) == 24
        assert {row["worker"] for row in rows} == {0, 1}, "the kernel spreads connections over both"
        health = get_json(status, "/healthz")
        assert health["status"] == "ok"
        assert health["workers"] == 2
        text = urllib.request.urlopen(f"http://127.0.0.1:{status}/metrics", timeout=5).read().decode()
        assert metric(text, "tunnel_active_connections", tunnel="edge") == 24
        assert metric(text, "tunnel_connections_opened_total", tunnel="edge") == 24
        assert metric(text, "tunnel_bytes_total", tunnel="edge", direction="in") == 2400
    finally:
        for conn in held:
            conn.close()
    assert daemon.stop() == 0


def test_sd_notify_ready_only_when_every_worker_listens(pki_files: PKI, tmp_path: Path, target: EchoTarget) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(20)
        port = free_port()
        config = write_yaml(tmp_path / "e.yaml", server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}"))
        log = tmp_path / "log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [*TUNNEL, "run", "--workers", "3", str(config)],
                stderr=log_file,
                env={"NOTIFY_SOCKET": str(notify_path), "PATH": "/usr/bin:/bin"},
            )
        try:
            message = sock.recv(4096).decode()
            assert message.startswith("READY=1")
            assert "STATUS=3 workers listening" in message
            assert log.read_text().count("listening tunnel=e") == 3
            process.send_signal(signal.SIGHUP)
            assert sock.recv(4096).decode().startswith("RELOADING=1")
            assert sock.recv(4096).decode().startswith("READY=1")
            assert log.read_text().count("reloaded tunnels=1") == 3
            process.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode().startswith("STOPPING=1")
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_revocation_reaches_every_worker(tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget) -> None:
    own = make_pki(tmp_path / "pki")
    daemon, port, status = start(own, tmp_path, daemons, target)
    keepers = [tls_client(own, port, "app1") for _ in range(8)]
    doomed = [tls_client(own, port, "app2") for _ in range(8)]
    try:
        for conn in keepers + doomed:
            assert echo_once(conn, b"x") == b"x"
        assert {row["worker"] for row in connections(status) if row["identity"] == "cn=app2"} == {0, 1}
        pki.revoke(own.dir, "app2")
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("reloaded tunnels=1", count=2)
        daemon.wait_for("closing tunnel=edge", count=8)
        assert all(is_closed(conn) for conn in doomed)
        assert all(echo_once(conn, b"y") == b"y" for conn in keepers)
    finally:
        for conn in keepers + doomed:
            conn.close()
    assert daemon.stop() == 0


def test_sigterm_drains_every_worker(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, status = start(pki_files, tmp_path, daemons, target)
    held = [tls_client(pki_files, port, "app1") for _ in range(10)]
    try:
        for conn in held:
            assert echo_once(conn, b"a") == b"a"
        assert {row["worker"] for row in connections(status)} == {0, 1}
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("draining", count=2)
        assert all(echo_once(conn, b"b") == b"b" for conn in held), "open connections finish"
    finally:
        for conn in held:
            conn.close()
    assert daemon.process.wait(timeout=10) == 0


def test_a_dead_worker_is_started_again(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, _ = start(pki_files, tmp_path, daemons, target)
    first = children(daemon.process.pid)
    os.kill(first[0], signal.SIGKILL)
    daemon.wait_for("starting it again")
    daemon.wait_for("ready tunnels=1", count=3)
    now = children(daemon.process.pid)
    assert len(now) == 2
    assert first[0] not in now
    for _ in range(10):
        with tls_client(pki_files, port, "app1") as conn:
            assert echo_once(conn, b"z") == b"z"
    assert daemon.stop() == 0


def test_workers_refuse_unix_listeners_and_port_zero(pki_files: PKI, tmp_path: Path) -> None:
    for listen, problem in [(f"unix:{tmp_path}/s.sock", "unix socket cannot be shared"), ("127.0.0.1:0", "port 0")]:
        path = write_yaml(tmp_path / "w.yaml", {**server_doc(pki_files, "127.0.0.1:9", listen=listen), "workers": 2})
        result = subprocess.run([*TUNNEL, "run", str(path)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        assert f"{path}: listen: " in result.stderr
        assert problem in result.stderr


def test_workers_will_not_share_a_port_with_another_process(pki_files: PKI, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_yaml(tmp_path / "w.yaml", server_doc(pki_files, "127.0.0.1:9", listen=f"127.0.0.1:{port}"))
        result = subprocess.run(
            [*TUNNEL, "run", "--workers", "2", str(path)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_workers_do_not_outlive_a_killed_supervisor(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, _, _ = start(pki_files, tmp_path, daemons, target)
    workers = children(daemon.process.pid)
    assert len(workers) == 2
    daemon.process.kill()
    daemon.process.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers still running"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]).lower()
    except (FileNotFoundError, IndexError):
        return "zombie"


TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 (INFO|WARNING|ERROR) (supervisor|worker=[01]) \S"
)


def test_every_log_line_says_which_process_wrote_it_in_utc(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, _, _ = start(pki_files, tmp_path, daemons, target)
    daemon.reload()
    assert daemon.stop() == 0
    lines = daemon.log().splitlines()
    assert lines
    for line in lines:
        assert TEXT_LINE.match(line), line
    assert any(" worker=0 " in line for line in lines)
    assert any(" worker=1 " in line for line in lines)


def test_json_lines_name_their_process_and_their_reload_and_signal_events(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    path = write_yaml(tmp_path / "edge.yaml", doc)
    daemon = DaemonProcess(tmp_path, "--workers", "2", "--log-format", "json", str(path))
    daemons.append(daemon)
    daemon.wait_for('"event": "ready"', timeout=20)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for('"event": "reloaded"', count=2, timeout=20)  # each worker
    assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.log().splitlines()]
    for record in records:
        assert record["time"].endswith("+00:00"), record
        assert record["process"] in ("supervisor", "worker=0", "worker=1"), record
    events = {(r["process"], r["event"]) for r in records}
    assert ("worker=0", "reloading") in events
    assert ("worker=1", "reloading") in events
    assert ("supervisor", "stopping") in events
    assert ("worker=0", "stopping") in events
    assert not [r for r in records if r["event"] == "message" and "reload" in r["message"]]


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1:`port` (/proc/net/tcp, state 0A)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            found.add(fields[9])
    return found


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def test_the_supervisor_owns_the_workers_listening_sockets(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    """One owner: the supervisor binds one SO_REUSEPORT socket per worker and hands it
    down (no probe, then a bind seconds later in another process); a restarted worker
    gets the same socket, whose backlog waited for it."""
    daemon, port, _ = start(pki_files, tmp_path, daemons, target)
    listening = listening_inodes(port)
    assert len(listening) == 2
    supervisor = daemon.process.pid
    assert listening <= socket_inodes(supervisor)
    workers = children(supervisor)
    held = [listening & socket_inodes(pid) for pid in workers]
    assert sorted(len(h) for h in held) == [1, 1]
    assert held[0] != held[1]
    os.kill(workers[0], signal.SIGKILL)
    daemon.wait_for("starting it again")
    daemon.wait_for("ready workers=2", count=1)
    deadline = time.monotonic() + 10
    while len(children(supervisor)) < 2 or not any(
        held[0] <= socket_inodes(pid) for pid in children(supervisor) if pid != workers[1]
    ):
        assert time.monotonic() < deadline, "the restarted worker did not get its socket back"
        time.sleep(0.1)
    assert listening_inodes(port) == listening  # the same two sockets all along
    assert daemon.stop() == 0


def test_a_port_the_workers_leave_on_reload_is_not_kept_open_by_the_supervisor(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    """The supervisor's copies of a socket nobody accepts on any more would queue connects
    for ever: it closes them when the tunnel moves."""
    daemon, port, _ = start(pki_files, tmp_path, daemons, target)
    new_port = free_port()
    path = tmp_path / "edge.yaml"
    path.write_text(path.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{new_port}"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded tunnels=1", count=2, timeout=20)
    deadline = time.monotonic() + 10
    while listening_inodes(port):
        assert time.monotonic() < deadline, "the old port is still listening"
        time.sleep(0.1)
    with tls_client(pki_files, new_port, "app1") as client:
        assert echo_once(client, b"moved") == b"moved"
    assert daemon.stop() == 0


def test_workers_serve_an_address_two_tunnels_share_by_sni(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    """Every worker gets one socket for the shared address (the supervisor binds per
    address, not per tunnel), and every connect is served, whichever worker takes it."""
    port = free_port()
    paths = []
    for name in ("a", "b"):
        doc = server_doc(
            pki_files,
            target.address,
            listen=f"127.0.0.1:{port}",
            name=name,
            sni=[f"{name}.internal", "localhost"] if name == "a" else [f"{name}.internal"],
        )
        paths.append(str(write_yaml(tmp_path / f"{name}.yaml", doc)))
    daemon = DaemonProcess(tmp_path, "--workers", "2", *paths)
    daemons.append(daemon)
    daemon.wait_for("ready workers=2", timeout=20)
    for _ in range(30):  # "localhost" (tls_client's server name) is tunnel a's
        conn = tls_client(pki_files, port, "app1", timeout=3)
        try:
            assert echo_once(conn, b"sni") == b"sni"
        finally:
            conn.close()
    assert daemon.stop() == 0


# -- session resumption across workers and restarts (session tickets, tunnel.ticket_keys) -------


def resume(p: PKI, port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool | None, bytes, Any]:
    """One connection offering `session`: (resumed?, the echo of b"hi", its session).
    Closed cleanly (a session cache drops the session of a connection cut short)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            try:
                data = echo_once(tls, b"hi")
            except OSError:
                data = b""
            resumed, next_session = tls.session_reused, tls.session
            if data:
                tls.unwrap()
            return resumed, data, next_session


def test_every_resumption_resumes_whichever_worker_accepts_it(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    """With a session cache per worker, half the resumptions landed on the other worker
    and made a full handshake."""
    daemon, port, _ = start(pki_files, tmp_path, daemons, target)
    ctx = pki_files.client_context("app1")
    resumed, data, session = resume(pki_files, port, ctx, None)
    assert (resumed, data) == (False, b"hi")
    outcomes = []
    for _ in range(100):
        resumed, data, session = resume(pki_files, port, ctx, session)
        outcomes.append((resumed, data))
    assert outcomes.count((True, b"hi")) == 100, outcomes
    log = daemon.wait_for("TLSv1.3 resumed", count=100)
    for worker in ("worker=0", "worker=1"):  # the kernel spread them over both
        assert any(worker in line and "resumed" in line for line in log.splitlines()), worker


def test_a_revocation_by_reload_refuses_a_resumption_on_either_worker(
    tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    """A full handshake on one worker; app1 revoked and reloaded; its session, offered
    until each worker has refused it, never gets through (the new CRL changed every
    ticket key: a full handshake, which the revocation refuses)."""
    p = make_pki(tmp_path / "pki")
    daemon, port, _ = start(p, tmp_path, daemons, target)
    ctx = p.client_context("app1")
    resumed, data, session = resume(p, port, ctx, None)
    assert data == b"hi"
    pki.revoke(p.dir, "app1")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded tunnels=1", count=2)  # by both workers
    refusing: set[str] = set()
    for _ in range(40):
        resumed, data, _ = resume(p, port, ctx, session)
        assert data == b""
        assert not resumed
        lines = [line for line in daemon.log().splitlines() if "refused: revoked" in line]
        refusing = {w for w in ("worker=0", "worker=1") if any(w in line for line in lines)}
        if len(refusing) == 2:
            break
    assert refusing == {"worker=0", "worker=1"}, daemon.log()


def shows(secret: bytes, data: bytes) -> bool:
    """Whether `data` holds `secret`, raw or in hex."""
    return secret in data or secret.hex().encode() in data


def test_sessions_resume_across_a_restart_that_passes_the_secret_which_never_shows(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    """The master secret reaches a new process (here: from the test, as a hand-over
    would pass it) through an inherited pipe: not in any process's environment or
    command line, nor on disk; a restart given it resumes the old process's sessions, one
    not given it does not."""
    secret = create_secret()
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    doc["allow"] = {"cn": ["app1"]}
    path = write_yaml(tmp_path / "edge.yaml", doc)
    ctx = pki_files.client_context("app1")

    def run(secret: bytes | None) -> DaemonProcess:
        passed = pass_secret(secret) if secret is not None else None
        try:
            daemon = DaemonProcess(
                tmp_path,
                "--workers",
                "2",
                str(path),
                pass_fds=[passed.fd] if passed else (),
                env=passed.env if passed else None,
            )
        finally:
            if passed:
                passed.close()
        daemons.append(daemon)
        daemon.wait_for("ready workers=2", timeout=20)
        return daemon

    first = run(secret)
    for pid in [first.process.pid, *children(first.process.pid)]:
        for leak in (f"/proc/{pid}/environ", f"/proc/{pid}/cmdline"):
            text = Path(leak).read_bytes()
            assert not shows(secret, text), leak
    _, data, session = resume(pki_files, port, ctx, None)
    assert data == b"hi"
    assert first.stop() == 0
    second = run(secret)
    resumed, data, session = resume(pki_files, port, ctx, session)
    assert (resumed, data) == (True, b"hi")
    assert second.stop() == 0
    run(None)
    resumed, data, _ = resume(pki_files, port, ctx, session)
    assert (resumed, data) == (False, b"hi")
    for file in tmp_path.rglob("*"):
        if file.is_file():
            content = file.read_bytes()
            assert not shows(secret, content), file
