"""Running it like infrastructure: sd_notify, /healthz, /metrics, /connections,
`tunnel status`, JSON logs and PROXY v2, against a real `tunnel run`."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.helpers import PKI, client_doc, free_port, server_doc, write_yaml
from tests.process import TUNNEL, DaemonProcess, EchoTarget, echo_once, is_closed, tls_client
from tests.unit.test_proxy_protocol import SUBTYPE_CN, SUBTYPE_VERSION, parse_v2, ssl_info


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent); label order does not matter."""
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, label_text = sample.partition("{")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', label_text))
        if sample_name == name and found == labels:
            return float(value)
    return 0.0


def start(
    p: PKI, tmp: Path, daemons: list[DaemonProcess], target: str, *args: str, **extra: Any
) -> tuple[DaemonProcess, int, int]:
    port, status = free_port(), free_port()
    doc = server_doc(p, target, listen=f"127.0.0.1:{port}", **extra)
    doc["tls"]["crl"] = str(p.dir / "crl.pem")
    daemon = DaemonProcess(tmp, *args, "--status", f"127.0.0.1:{status}", str(write_yaml(tmp / "edge.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    return daemon, port, status


def test_sd_notify_ready_reloading_stopping(pki_files: PKI, tmp_path: Path, target: EchoTarget) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{free_port()}")
        config = write_yaml(tmp_path / "edge.yaml", doc)
        log = (tmp_path / "log").open("wb")
        process = subprocess.Popen(
            [*TUNNEL, "run", str(config)], stderr=log, env={"NOTIFY_SOCKET": str(path), "PATH": "/usr/bin:/bin"}
        )
        try:
            ready = sock.recv(4096).decode()
            assert ready.splitlines()[0] == "READY=1"
            assert "STATUS=1 tunnels listening" in ready
            assert "listening tunnel=edge" in (tmp_path / "log").read_text(), "READY only after binding"
            process.send_signal(signal.SIGHUP)
            reloading = sock.recv(4096).decode()
            assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert sock.recv(4096).decode().startswith("READY=1")
            process.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode().startswith("STOPPING=1")
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()


def test_healthz_connections_and_tunnel_status_show_who_is_connected(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, status = start(pki_files, tmp_path, daemons, target.address, limits={"drain_timeout": "5s"})
    code, body = get(status, "/healthz")
    assert code == 200
    assert json.loads(body) == {"status": "ok", "tunnels": {"edge": "listening"}}
    with tls_client(pki_files, port, "app1") as one, tls_client(pki_files, port, "app2") as two:
        assert echo_once(one, b"x" * 1000) == b"x" * 1000
        assert echo_once(two, b"y") == b"y"
        rows = json.loads(get(status, "/connections")[1])["connections"]
        assert sorted(r["identity"] for r in rows) == ["cn=app1", "cn=app2"]
        app1 = next(r for r in rows if r["identity"] == "cn=app1")
        assert app1["tunnel"] == "edge"
        assert app1["bytes_in"] == 1000
        assert app1["bytes_out"] == 1000
        assert app1["peer"] == f"127.0.0.1:{one.getsockname()[1]}"
        shown = subprocess.run([*TUNNEL, "status", f"127.0.0.1:{status}"], capture_output=True, text=True, timeout=10)
        assert shown.returncode == 0, shown.stderr
        assert "edge" in shown.stdout
        assert "listening" in shown.stdout
        assert "cn=app1" in shown.stdout
        assert "cn=app2" in shown.stdout
        assert f"127.0.0.1:{one.getsockname()[1]}" in shown.stdout
        health = subprocess.run([*TUNNEL, "status", "--health", f"127.0.0.1:{status}"], capture_output=True, timeout=10)
        assert health.returncode == 0
        # draining: not listening any more, so unhealthy, while the connections finish
        daemon.signal(signal.SIGTERM)
        daemon.wait_for("draining")
        code, body = get(status, "/healthz")
        assert code == 503
        assert json.loads(body)["tunnels"] == {"edge": "not listening"}
        health = subprocess.run([*TUNNEL, "status", "--health", f"127.0.0.1:{status}"], capture_output=True, timeout=10)
        assert health.returncode == 1
    assert daemon.process.wait(timeout=10) == 0


def test_a_tunnel_draining_after_a_reload_moved_it_does_not_make_the_daemon_unhealthy(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, status = start(pki_files, tmp_path, daemons, target.address, limits={"drain_timeout": "30s"})
    with tls_client(pki_files, port, "app1") as held:
        assert echo_once(held, b"x") == b"x"
        moved = free_port()
        doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{moved}", limits={"drain_timeout": "30s"})
        doc["tls"]["crl"] = str(pki_files.dir / "crl.pem")
        write_yaml(tmp_path / "edge.yaml", doc)
        assert "reloaded" in daemon.reload()
        # The old listener is closed and its connection drains; the new one serves.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        code, body = get(status, "/healthz")
        assert (code, json.loads(body)) == (200, {"status": "ok", "tunnels": {"edge": "listening"}})
        rows = json.loads(get(status, "/connections")[1])["connections"]
        assert [r["identity"] for r in rows] == ["cn=app1"]
        assert echo_once(held, b"still") == b"still"
        with tls_client(pki_files, moved, "app2") as fresh:
            assert echo_once(fresh, b"y") == b"y"


def samples(text: str, name: str) -> list[str]:
    """Every sample line of metric `name` in Prometheus text (one per label set, if well formed)."""
    return [line for line in text.splitlines() if line.startswith((f"{name} ", f"{name}{{"))]


def test_a_tunnel_moved_by_reload_keeps_one_series_per_metric_and_its_byte_count(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, status = start(pki_files, tmp_path, daemons, target.address, limits={"drain_timeout": "30s"})
    per_tunnel = (
        "tunnel_active_connections",
        "tunnel_handshaking_connections",
        "tunnel_listening",
        "tunnel_crl_next_update_timestamp_seconds",
    )
    with tls_client(pki_files, port, "app1") as held:
        assert echo_once(held, b"a" * 3000) == b"a" * 3000
        moved = free_port()
        doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{moved}", limits={"drain_timeout": "30s"})
        doc["tls"]["crl"] = str(pki_files.dir / "crl.pem")
        write_yaml(tmp_path / "edge.yaml", doc)
        assert "reloaded" in daemon.reload()
        with tls_client(pki_files, moved, "app2") as fresh:
            assert echo_once(fresh, b"b" * 2000) == b"b" * 2000
            text = get(status, "/metrics")[1].decode()
            for name in per_tunnel:
                assert len(samples(text, name)) == 1, (name, samples(text, name))
            assert len(samples(text, "tunnel_bytes_total")) == 2, samples(text, "tunnel_bytes_total")
            files = [line.split(" ")[0] for line in samples(text, "tunnel_certificate_not_after_timestamp_seconds")]
            assert len(files) == len(set(files)), files
            assert metric(text, "tunnel_active_connections", tunnel="edge") == 2
            assert metric(text, "tunnel_listening", tunnel="edge") == 1
            assert metric(text, "tunnel_bytes_total", tunnel="edge", direction="in") == 5000
    daemon.wait_for("closed tunnel=edge", count=2)
    # The next reload forgets the drained old listener: its bytes stay counted.
    assert "reloaded" in daemon.reload()
    text = get(status, "/metrics")[1].decode()
    assert metric(text, "tunnel_bytes_total", tunnel="edge", direction="in") == 5000
    assert metric(text, "tunnel_bytes_total", tunnel="edge", direction="out") == 5000
    assert daemon.stop() == 0


def test_the_status_address_answers_get_only_and_ignores_a_query_string(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    _, _, status = start(pki_files, tmp_path, daemons, target.address)
    assert get(status, "/healthz?verbose=1")[0] == 200
    request = urllib.request.Request(f"http://127.0.0.1:{status}/healthz", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    refused.value.close()
    assert refused.value.code == 405


def test_tunnel_status_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = subprocess.run([*TUNNEL, "status", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no answer from 127.0.0.1:")


def test_metrics_move_with_connections_and_match_the_certificates(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, status = start(pki_files, tmp_path, daemons, target.address)
    before = get(status, "/metrics")[1].decode()
    assert metric(before, "tunnel_connections_opened_total", tunnel="edge") == 0
    with tls_client(pki_files, port, "app1") as conn:
        assert echo_once(conn, b"z" * 5000) == b"z" * 5000
        during = get(status, "/metrics")[1].decode()
        assert metric(during, "tunnel_active_connections", tunnel="edge") == 1
    with tls_client(pki_files, port, "stranger") as refused:
        assert is_closed(refused)
    daemon.wait_for("refused: not allowed")
    daemon.wait_for("closed tunnel=edge")
    daemon.reload()
    after = get(status, "/metrics")[1].decode()
    assert metric(after, "tunnel_connections_opened_total", tunnel="edge") == 1
    assert metric(after, "tunnel_connections_closed_total", tunnel="edge", reason="done") == 1
    assert metric(after, "tunnel_connections_refused_total", tunnel="edge", reason="not allowed") == 1
    assert metric(after, "tunnel_active_connections", tunnel="edge") == 0
    assert metric(after, "tunnel_bytes_total", tunnel="edge", direction="in") == 5000
    assert metric(after, "tunnel_bytes_total", tunnel="edge", direction="out") == 5000
    assert metric(after, "tunnel_handshake_duration_seconds_count", tunnel="edge") == 2
    assert metric(after, "tunnel_connect_duration_seconds_count", tunnel="edge") == 1
    assert metric(after, "tunnel_reloads_total", result="success") == 1
    assert metric(after, "tunnel_last_reload_success") == 1
    assert metric(after, "tunnel_listening", tunnel="edge") == 1
    for name in ("server", "ca"):
        cert = x509.load_pem_x509_certificate(
            pki_files.crt(name).read_bytes() if name != "ca" else pki_files.ca.read_bytes()
        )
        path = str(pki_files.crt(name)) if name != "ca" else str(pki_files.ca)
        value = metric(after, "tunnel_certificate_not_after_timestamp_seconds", tunnel="edge", file=path)
        assert value == cert.not_valid_after_utc.timestamp()
    crl = x509.load_pem_x509_crl((pki_files.dir / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    assert metric(after, "tunnel_crl_next_update_timestamp_seconds", tunnel="edge") == crl.next_update_utc.timestamp()
    assert daemon.stop() == 0


def test_json_logs_parse_and_name_the_peer_identity(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    daemon, port, _ = start(pki_files, tmp_path, daemons, target.address, "--log-format", "json")
    with tls_client(pki_files, port, "app1") as conn:
        assert echo_once(conn, b"json") == b"json"
    with tls_client(pki_files, port, "stranger") as refused:
        assert is_closed(refused)
    daemon.wait_for('"event": "refused"')
    daemon.wait_for('"event": "closed"')
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log().splitlines()]
    keys = {"time", "level", "event", "tunnel", "peer", "identity", "bytes_in", "bytes_out", "duration", "reason"}
    for line in lines:
        assert keys <= set(line), line
    opened = next(line for line in lines if line["event"] == "opened")
    assert opened["identity"] == "cn=app1"
    assert opened["tunnel"] == "edge"
    assert opened["peer"].startswith("127.0.0.1:")
    closed = next(line for line in lines if line["event"] == "closed")
    assert (closed["bytes_in"], closed["bytes_out"], closed["reason"]) == (4, 4, "both sides closed")
    assert isinstance(closed["duration"], float)
    refused_line = next(line for line in lines if line["event"] == "refused")
    assert refused_line["level"] == "warning"
    assert refused_line["identity"] == "cn=stranger"
    assert refused_line["reason"].startswith("not allowed")
    assert any(line["event"] == "ready" for line in lines)


def test_proxy_protocol_v2_tells_the_target_who_the_client_is(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    received: list[bytes] = []
    with socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen()

        def serve() -> None:
            conn, _ = backend.accept()
            with conn:
                data = b""
                while len(data) < 200 and (chunk := conn.recv(4096)):
                    data += chunk
                    if data.endswith(b"hello"):
                        break
                received.append(data)
                conn.sendall(b"ok")

        thread = threading.Thread(target=serve)
        thread.start()
        backend_address = f"127.0.0.1:{backend.getsockname()[1]}"
        daemon, port, _ = start(pki_files, tmp_path, daemons, backend_address, proxy_protocol="v2")
        with tls_client(pki_files, port, "app1") as conn:
            conn.sendall(b"hello")
            assert conn.recv(10) == b"ok"
            client_address = conn.getsockname()
        thread.join(timeout=10)
    header, used = parse_v2(received[0])
    assert received[0][used:] == b"hello"
    assert header.source == ("127.0.0.1", client_address[1])
    assert header.destination == ("127.0.0.1", port)
    info = ssl_info(header)
    assert info.verify == 0
    assert dict(info.subtlvs) == {SUBTYPE_VERSION: b"TLSv1.3", SUBTYPE_CN: b"app1"}
    assert daemon.stop() == 0


def test_status_address_in_a_tunnel_file(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    status = free_port()
    doc = client_doc(pki_files, target.address, listen=f"127.0.0.1:{free_port()}", status=f"127.0.0.1:{status}")
    daemon = DaemonProcess(tmp_path, str(write_yaml(tmp_path / "c.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    deadline = time.monotonic() + 5
    while get(status, "/healthz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert get(status, "/nope")[0] == 404
    assert daemon.stop() == 0
