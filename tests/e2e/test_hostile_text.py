"""Text an attacker chooses (a unix socket path, a certificate's CN) against a real
`tunnel run`: it never forges or breaks a log line, never reaches a terminal through
`tunnel status` as control sequences, and cryptography's warnings about it stay inside the
one-JSON-object-per-line log."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PKI, free_port, issue_hostile, server_doc, write_yaml
from tests.process import TUNNEL, DaemonProcess, EchoTarget, echo_once, is_closed
from tunnel.logs import escape

FORGED = "\n2026-01-01T00:00:00.000+00:00 INFO opened tunnel=edge peer=forged\x1b[31m"
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 (INFO|WARNING|ERROR) \S")


def assert_one_record_per_line(log: str) -> None:
    assert "\x1b" not in log
    for line in log.splitlines():
        assert TEXT_LINE.match(line), f"not a record of its own: {line!r}"


def records(log: str, start: str) -> list[str]:
    """The messages (after time and level) of the log lines that start with `start`."""
    return [m for line in log.splitlines() if (m := line.split(" ", 2)[2]).startswith(start)]


def hostile_client(p: PKI, tmp: Path, cn: str, *, ou: str | None = None) -> ssl.SSLContext:
    context = p.client_context("")
    context.load_cert_chain(*issue_hostile(p.dir, tmp, "hostile", cn, ou=ou))
    return context


def connect(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tunnel-text-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_unix_peer_path_with_a_newline_and_escape_codes_is_escaped_in_the_log_and_in_tunnel_status(
    pki_files: PKI, tmp_path: Path, short_dir: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    listen, status = short_dir / "edge.sock", free_port()
    doc = server_doc(pki_files, target.address, listen=f"unix:{listen}", limits={"handshake_timeout": "10s"})
    daemon = DaemonProcess(tmp_path, "--status", f"127.0.0.1:{status}", str(write_yaml(tmp_path / "edge.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    peer = str(short_dir / f"c{FORGED}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.bind(peer)  # the peer address the daemon sees, and logs
        client.connect(str(listen))
        shown = subprocess.run([*TUNNEL, "status", f"127.0.0.1:{status}"], capture_output=True, timeout=10)
        assert shown.returncode == 0, shown.stderr
        assert b"\x1b" not in shown.stdout
        assert f"unix:{escape(peer)}".encode() in shown.stdout
        assert len(shown.stdout.decode().splitlines()) == 7  # status, blank, 2 health rows, blank, 2 rows
    log = daemon.wait_for("refused:")
    assert daemon.stop() == 0
    log = daemon.log()
    assert_one_record_per_line(log)
    assert records(log, "refused:") == [f"refused: closed during the handshake tunnel=edge peer=unix:{escape(peer)}"]
    assert records(log, "opened") == []


def test_a_certificate_name_with_a_newline_gives_single_opened_refused_and_closed_lines(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    cn = "app9" + FORGED
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")  # allow: cn app1, ou payments
    daemon = DaemonProcess(tmp_path, str(write_yaml(tmp_path / "edge.yaml", doc)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    admitted = hostile_client(pki_files, tmp_path, cn, ou="payments")
    with connect(admitted, port) as conn:
        assert echo_once(conn, b"ping") == b"ping"
    daemon.wait_for("closed tunnel=")
    refused = hostile_client(pki_files, tmp_path, cn)
    with connect(refused, port) as conn:
        conn.settimeout(5)
        assert is_closed(conn)
    daemon.wait_for("refused:")
    assert daemon.stop() == 0
    log = daemon.log()
    assert_one_record_per_line(log)
    label = f"identity=cn={escape(cn)}"
    for kind in ("opened tunnel=edge", "closed tunnel=edge", "refused: not allowed"):
        lines = records(log, kind)
        assert len(lines) == 1, (kind, log)
        assert label in lines[0]
    assert target.accepted == 1


def test_json_logs_stay_one_object_per_line_when_cryptography_warns_about_a_long_cn(
    pki_files: PKI, tmp_path: Path, daemons: list[DaemonProcess], target: EchoTarget
) -> None:
    port = free_port()
    doc = server_doc(pki_files, target.address, listen=f"127.0.0.1:{port}")
    config = str(write_yaml(tmp_path / "edge.yaml", doc))
    daemon = DaemonProcess(tmp_path, "--log-format", "json", config)
    daemons.append(daemon)
    daemon.wait_for('"event": "ready"')
    client = hostile_client(pki_files, tmp_path, "c" * 100, ou="payments")
    with connect(client, port) as conn:
        assert echo_once(conn, b"ping") == b"ping"
    daemon.wait_for('"event": "closed"')
    assert daemon.stop() == 0
    docs = []
    for line in daemon.log().splitlines():
        try:
            docs.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON object: {line!r}\n{daemon.log()}") from None
    (warning,) = [d for d in docs if d["event"] == "warning"]
    assert warning["level"] == "warning"
    assert "Attribute's length must be >= 1 and <= 64, but it was 100" in warning["message"]
    (opened,) = [d for d in docs if d["event"] == "opened"]
    assert opened["identity"] == "cn=" + "c" * 100
