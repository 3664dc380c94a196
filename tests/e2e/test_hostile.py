"""The edge: scanners, slowloris, floods, dead targets, fd exhaustion. A real `tunnel run`
keeps serving allowed clients through all of it, and gives back every file descriptor."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import resource
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import PKI, closed_by_peer, free_port, server_doc, write_padded_chain, write_yaml
from tests.process import TUNNEL, DaemonProcess, EchoTarget, echo_once, is_closed, tls_client


def start_server(
    p: PKI, tmp: Path, daemons: list[DaemonProcess], target: str, *args: str, **limits: Any
) -> tuple[DaemonProcess, int]:
    port = free_port()
    doc = server_doc(p, target, listen=f"127.0.0.1:{port}")
    doc["limits"] = {"handshake_timeout": "1s", "connect_timeout": "1s", "drain_timeout": "1s", **limits}
    daemon = DaemonProcess(tmp, *args, str(write_yaml(tmp / "edge.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    return daemon, port


def drain(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (EOF or reset)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def served(p: PKI, port: int, name: str = "app1", source: str | None = None) -> bool:
    with tls_client(p, port, name, source=source) as conn:
        return echo_once(conn, b"ping") == b"ping"


def test_slowloris_sockets_neither_block_allowed_clients_nor_outlive_the_handshake_timeout(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port = start_server(pki_files, tmp_path, daemons, target.address)
    baseline = daemon.open_fds()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    try:
        started = time.monotonic()
        assert served(pki_files, port, source="127.0.0.2")  # another source than the crowd's
        assert time.monotonic() - started < 1.0, "the allowed client must be served promptly"
        time.sleep(1.5)  # past handshake_timeout
        for sock in silent:
            sock.settimeout(2)
            assert is_closed(sock)
    finally:
        for sock in silent:
            sock.close()
    assert target.accepted == 1
    daemon.wait_for_fds(baseline)
    # limits.per_source.handshakes (32 by default) held until the timeout, the rest reset at once
    assert daemon.log().count("refused: handshake timeout") == 32
    log = daemon.log()
    assert "shed tunnel=edge peer=127.0.0.1:" in log
    assert "per_source.handshakes (more are summed every 5s)" in log
    assert daemon.stop() == 0
    assert "shed tunnel=edge 267 more connections in" in daemon.log()


def test_handshake_flood_from_many_threads_serves_every_allowed_client(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port = start_server(pki_files, tmp_path, daemons, target.address)
    baseline = daemon.open_fds()

    def one(i: int) -> bool:
        if i % 4 == 3:  # garbage mixed into the flood
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(b"\x16\x03\x01\xff\xff" + bytes(200))
                reply = drain(raw)
                return reply == b"" or reply[0] == 0x15  # nothing, or a TLS alert, then closed
        return served(pki_files, port, "app1" if i % 2 else "app2")

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results)
    assert target.accepted == 150
    daemon.wait_for_fds(baseline)
    assert daemon.stop() == 0


def test_the_connection_cap_is_never_exceeded_at_the_target(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port = start_server(
        pki_files, tmp_path, daemons, target.address, max_connections=4, handshake_timeout="10s"
    )
    errors: list[str] = []

    def hold(i: int) -> None:
        try:
            with tls_client(pki_files, port, "app1", timeout=20) as conn:
                if echo_once(conn, f"client {i}".encode()) != f"client {i}".encode():
                    errors.append(f"client {i}: wrong echo")
                time.sleep(0.3)
        except (OSError, ssl.SSLError) as exc:
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert target.accepted == 16, "every client is served in the end: they waited in the backlog"
    assert target.max_active <= 4
    assert daemon.stop() == 0


def test_idle_connections_are_reaped(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port = start_server(pki_files, tmp_path, daemons, target.address, idle_timeout="500ms")
    baseline = daemon.open_fds()
    with tls_client(pki_files, port, "app1") as conn:
        assert echo_once(conn, b"a") == b"a"
        time.sleep(0.3)
        assert echo_once(conn, b"b") == b"b", "activity resets the idle clock"
        time.sleep(0.9)
        assert is_closed(conn)
    assert "why=idle for 0.5s" in daemon.wait_for("why=idle")
    daemon.wait_for_fds(baseline)
    assert daemon.stop() == 0


def test_a_dead_target_closes_clients_promptly_and_is_used_again_when_back(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    target_port = free_port()
    daemon, port = start_server(pki_files, tmp_path, daemons, f"127.0.0.1:{target_port}")
    baseline = daemon.open_fds()
    started = time.monotonic()
    with tls_client(pki_files, port, "app1") as conn:
        assert is_closed(conn)
    assert time.monotonic() - started < 1.0
    daemon.wait_for("target unavailable")
    daemon.wait_for_fds(baseline)
    # the target comes back on the same port
    with socket.socket() as back:
        back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        back.bind(("127.0.0.1", target_port))
        back.listen()
        with tls_client(pki_files, port, "app1") as conn:
            conn.sendall(b"hello")
            accepted, _ = back.accept()
            with accepted:
                assert accepted.recv(100) == b"hello"
    assert daemon.stop() == 0


def test_a_target_that_never_answers_costs_only_the_connect_timeout(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    with socket.socket() as blackhole:  # a listener whose backlog is full never completes connects
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        fillers = [socket.socket() for _ in range(4)]
        for f in fillers:
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(blackhole.getsockname())
        try:
            daemon, port = start_server(
                pki_files, tmp_path, daemons, f"127.0.0.1:{blackhole.getsockname()[1]}", connect_timeout="500ms"
            )
            started = time.monotonic()
            with tls_client(pki_files, port, "app1") as conn:
                assert is_closed(conn)
            assert time.monotonic() - started < 2.0
            assert "connect timeout" in daemon.wait_for("target unavailable")
        finally:
            for f in fillers:
                f.close()
    assert daemon.stop() == 0


def test_running_out_of_file_descriptors_is_survived(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port = start_server(pki_files, tmp_path, daemons, target.address, handshake_timeout="2s")
    baseline = daemon.open_fds()
    resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (baseline + 20, baseline + 20))
    hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    try:
        daemon.wait_for("Too many open files")
    finally:
        for hog in hogs:
            hog.close()
    # the hogs' slots come free after their handshake timeout; the daemon recovers
    daemon.wait_for("accept recovered", timeout=15)
    deadline = time.monotonic() + 15
    while True:
        try:
            assert served(pki_files, port)
            break
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    daemon.wait_for_fds(baseline)
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def healthz(port: int, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_idle_connections_to_the_status_address_cost_the_tunnels_nothing(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    status = free_port()
    daemon, port = start_server(pki_files, tmp_path, daemons, target.address, "--status", f"127.0.0.1:{status}")
    resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (128, 128))
    baseline = daemon.open_fds()
    idle = [socket.create_connection(("127.0.0.1", status)) for _ in range(200)]
    try:
        started = time.monotonic()
        assert served(pki_files, port)
        assert healthz(status) == (200, {"status": "ok", "tunnels": {"edge": "listening"}})
        assert time.monotonic() - started < 1.0, "the tunnel and /healthz must answer promptly"
        # Past the cap (32) the oldest idle ones were closed as new ones came...
        assert sum(not closed_by_peer(sock) for sock in idle) <= 32
        assert daemon.open_fds() <= baseline + 32
        # ...and the rest get two seconds to say something.
        time.sleep(2.5)
        assert all(closed_by_peer(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    daemon.wait_for_fds(baseline)
    assert "Too many open files" not in daemon.log()
    assert daemon.stop() == 0


def test_healthz_says_503_while_a_tunnel_cannot_accept_and_200_once_it_can_again(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    status = free_port()
    daemon, port = start_server(
        pki_files, tmp_path, daemons, target.address, "--status", f"127.0.0.1:{status}", handshake_timeout="60s"
    )
    assert healthz(status) == (200, {"status": "ok", "tunnels": {"edge": "listening"}})
    baseline = daemon.open_fds()
    resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (baseline + 20, baseline + 20))
    hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    try:
        daemon.wait_for("Too many open files")
        code, doc = healthz(status)
        assert (code, doc) == (
            503,
            {"status": "unavailable", "tunnels": {"edge": "accept failing: Too many open files"}},
        )
        shown = subprocess.run([*TUNNEL, "status", f"127.0.0.1:{status}"], capture_output=True, text=True, timeout=10)
        assert shown.returncode == 1
        assert "edge    accept failing: Too many open files" in shown.stdout
    finally:
        for hog in hogs:
            hog.close()
    # The hogs' handshakes end at their close, the backlog is worked off, accept works again.
    deadline = time.monotonic() + 10
    while healthz(status)[0] != 200:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    assert healthz(status) == (200, {"status": "ok", "tunnels": {"edge": "listening"}})
    assert served(pki_files, port)
    assert daemon.stop() == 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_does_not_grow_with_refusals(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port = start_server(pki_files, tmp_path, daemons, target.address)

    def refused(i: int) -> bool:
        name = ("stranger", "other-app1", "expired", "")[i % 4]
        try:
            with tls_client(pki_files, port, name) as conn:
                return is_closed(conn)
        except (OSError, ssl.SSLError):
            return True

    def round_of(n: int) -> None:
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(refused, range(n)))

    round_of(300)  # warm up: allocator pools, caches
    settled = rss_kib(daemon.process.pid)
    round_of(600)
    grown = rss_kib(daemon.process.pid) - settled
    assert grown < 4096, f"RSS grew {grown} KiB over 600 refused handshakes"
    assert target.accepted == 0
    assert daemon.stop() == 0


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` so far, from the scheduler's nanosecond counters
    (/proc/PID/task/TID/schedstat, first field; proc(5)), not the 10 ms ticks of stat."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def refused_attempt(ctx: ssl.SSLContext, port: int) -> None:
    """One handshake that the tunnel refuses; returns once the client has seen the refusal."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1)  # TLS 1.3: the refusal comes after the client's Finished
        except (OSError, ssl.SSLError):
            pass


def test_a_refused_hostile_handshake_costs_the_server_no_more_than_a_normal_refusal(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    """A client from a foreign CA is the normal refusal: a whole handshake, then its
    certificate refused. The hostile ones: a replayable ClientHello offering only
    ffdhe8192 (120 ms of the server's CPU each, were it accepted), and the foreign
    client's leaf with 150 junk certificates after it (22 ms each to refuse, were the
    list not bounded). Each costs the server within 3x the normal refusal, over 20 tries."""
    daemon, port = start_server(pki_files, tmp_path, daemons, target.address)
    normal = pki_files.client_context("other-app1")
    ffdhe = pki_files.client_context("other-app1")
    ffdhe.minimum_version = ssl.TLSVersion.TLSv1_3
    ffdhe.set_ecdh_curve("ffdhe8192")  # OpenSSL 3: the group list, ffdhe ones included
    padded = pki_files.client_context("")
    padded.load_cert_chain(
        write_padded_chain(pki_files.other / "other-app1.crt", tmp_path / "padded.pem"),
        pki_files.other / "other-app1.key",
    )
    tries = 20
    refusals = 0

    def cost(ctx: ssl.SSLContext) -> float:
        nonlocal refusals
        for _ in range(3):  # warm up
            refused_attempt(ctx, port)
        refusals += 3
        daemon.wait_for("refused:", count=refusals)
        before = cpu_seconds(daemon.process.pid)
        for _ in range(tries):
            refused_attempt(ctx, port)
        refusals += tries
        daemon.wait_for("refused:", count=refusals)
        return cpu_seconds(daemon.process.pid) - before

    baseline = cost(normal)
    costs = {"ffdhe8192 only": cost(ffdhe), "150 junk certificates": cost(padded)}
    for name, spent in costs.items():
        assert spent <= 3 * baseline, (
            f"{name}: {spent / tries * 1000:.2f} ms of server CPU per refusal, "
            f"a normal refusal {baseline / tries * 1000:.2f} ms"
        )
    log = daemon.log()
    for reason in ("unknown CA", "no shared key exchange group", "certificate list too long"):
        assert log.count(f"refused: {reason} tunnel=") == tries + 3, log
    assert target.accepted == 0
    assert daemon.stop() == 0
