"""`tunnel check` and `tunnel run` as a user runs them: real processes, real exit codes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PKI, client_doc, free_port, issue_odd, server_doc, write_yaml

TUNNEL = [sys.executable, "-m", "tunnel.cli"]


def tunnel(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNEL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_check_accepts_good_files(pki_files: PKI, tmp_path: Path) -> None:
    server = write_yaml(tmp_path / "server.yaml", server_doc(pki_files, "127.0.0.1:6379"))
    client = write_yaml(tmp_path / "client.yaml", client_doc(pki_files, "127.0.0.1:6380"))
    result = tunnel("check", str(server), str(client))
    assert result.returncode == 0, result.stderr
    assert f"ok: {server}" in result.stdout
    assert f"ok: {client}" in result.stdout


def test_check_a_directory(pki_files: PKI, tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", server_doc(pki_files, "127.0.0.1:6379", listen="127.0.0.1:7001"))
    write_yaml(tmp_path / "b.yaml", client_doc(pki_files, "127.0.0.1:7001", listen="127.0.0.1:7002"))
    result = tunnel("check", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok: ") == 2


def _broken(p: PKI, tmp: Path, change: str) -> dict[str, Any]:
    doc = server_doc(p, "127.0.0.1:6379")
    if change == "unknown-key":
        doc["tls"]["cerificate"] = "x"
    elif change == "missing-file":
        doc["tls"]["crl"] = str(tmp / "nope.pem")
    elif change == "wrong-key":
        doc["tls"]["key"] = str(p.key("app1"))
    elif change == "expired-cert":
        doc["tls"]["cert"] = str(p.crt("expired"))
        doc["tls"]["key"] = str(p.key("expired"))
    elif change == "cert-is-a-ca":
        cert, key = issue_odd(p.dir, "ca-leaf", kind="server", ca=True, out=tmp)
        doc["tls"]["cert"], doc["tls"]["key"] = str(cert), str(key)
    elif change == "other-ca":
        doc["tls"]["ca"] = str(p.other / "ca.crt")
    elif change == "no-allow":
        del doc["allow"]
    elif change == "bad-duration":
        doc["limits"]["idle_timeout"] = "forever"
    elif change == "unix-on-tcp-listen":
        doc["unix"] = {"mode": "0660", "group": "root"}
    elif change == "unix-bad-mode":
        doc["listen"] = f"unix:{tmp}/s.sock"
        doc["unix"] = {"mode": "0999"}
    elif change == "unix-unknown-user":
        doc["listen"] = f"unix:{tmp}/s.sock"
        doc["unix"] = {"allow_users": ["no-such-user-x"]}
    return doc


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("unknown-key", "tls.cerificate: unknown key"),
        ("missing-file", "tls.crl: file not found"),
        ("wrong-key", "tls.key: "),
        ("expired-cert", "tls.cert: "),
        ("cert-is-a-ca", "/ca-leaf.crt: peer certificate is a CA: a peer tunnel would refuse"),
        ("other-ca", "tls.cert: "),
        ("no-allow", "allow: required in server mode"),
        ("bad-duration", "limits.idle_timeout: expected a duration"),
        ("unix-on-tcp-listen", "unix: only for a unix: listen address (listen is 127.0.0.1:0)"),
        ("unix-bad-mode", 'unix.mode: expected an octal mode from "0000" to "0777"'),
        ("unix-unknown-user", "unix.allow_users[0]: no such user: 'no-such-user-x'"),
    ],
)
def test_check_names_file_key_and_problem(pki_files: PKI, tmp_path: Path, change: str, expected: str) -> None:
    path = write_yaml(tmp_path / "bad.yaml", _broken(pki_files, tmp_path, change))
    result = tunnel("check", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: {path}: "), result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_bad_yaml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("mode: server\nlisten: [unclosed\n")
    result = tunnel("check", str(path))
    assert result.returncode == 2
    assert "not valid YAML" in result.stderr
    assert "line" in result.stderr


def test_run_refuses_a_bad_file_before_binding_anything(pki_files: PKI, tmp_path: Path) -> None:
    port = free_port()
    good = write_yaml(tmp_path / "a.yaml", server_doc(pki_files, "127.0.0.1:6379", listen=f"127.0.0.1:{port}"))
    bad = write_yaml(tmp_path / "b.yaml", _broken(pki_files, tmp_path, "unknown-key"))
    result = tunnel("run", str(good), str(bad))
    assert result.returncode == 2
    assert f"error: {bad}: tls.cerificate: unknown key" in result.stderr
    assert "listening" not in result.stderr


def test_run_reports_a_port_in_use(pki_files: PKI, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_yaml(tmp_path / "a.yaml", server_doc(pki_files, "127.0.0.1:6379", listen=f"127.0.0.1:{port}"))
        result = tunnel("run", str(path))
    assert result.returncode == 1
    assert f"tunnel a: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        if process.poll() is not None:
            raise AssertionError(f"tunnel exited {process.returncode}:\n{content}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged in {timeout}s:\n{log.read_text()}")


def test_run_a_pair_carries_bytes_and_stops_cleanly_on_sigterm(pki_files: PKI, tmp_path: Path) -> None:
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))
        target.listen()
        server_port, client_port = free_port(), free_port()
        target_address = f"127.0.0.1:{target.getsockname()[1]}"
        write_yaml(tmp_path / "server.yaml", server_doc(pki_files, target_address, listen=f"127.0.0.1:{server_port}"))
        write_yaml(
            tmp_path / "client.yaml",
            client_doc(pki_files, f"127.0.0.1:{server_port}", listen=f"127.0.0.1:{client_port}"),
        )
        log = tmp_path / "tunnel.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen([*TUNNEL, "run", str(tmp_path)], stderr=log_file)
        try:
            wait_for_line(log, "ready tunnels=2", process)
            with socket.create_connection(("127.0.0.1", client_port), timeout=10) as app:
                app.sendall(b"hello")
                app.shutdown(socket.SHUT_WR)
                conn, _ = target.accept()
                with conn:
                    conn.settimeout(10)
                    assert conn.recv(100) == b"hello"
                    assert conn.recv(100) == b"", "half-close reaches the target"
                    conn.sendall(b"world")
                assert app.recv(100) == b"world"
            content = wait_for_line(log, "closed tunnel=server", process)
            assert "opened tunnel=server" in content
            assert "identity=cn=app1" in content
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    content = log.read_text()
    assert "stopping on SIGTERM" in content
    assert "stopped" in content


def test_certificates_near_expiry_are_warned_about_by_check_and_run(tmp_path: Path) -> None:
    from tunnel import pki

    ca = tmp_path / "ca"
    pki.init_ca(ca)
    pki.issue(ca, "soon", kind="server", dns=["localhost"], days=10)
    doc = {
        "mode": "server",
        "listen": f"127.0.0.1:{free_port()}",
        "target": "127.0.0.1:6379",
        "tls": {"cert": str(ca / "soon.crt"), "key": str(ca / "soon.key"), "ca": str(ca / "ca.crt")},
        "allow": {"any": True},
    }
    path = write_yaml(tmp_path / "soon.yaml", doc)
    checked = tunnel("check", str(path))
    assert checked.returncode == 0, checked.stderr
    assert f"warning: {path}: tls.cert: {ca / 'soon.crt'} expires in 9 days" in checked.stderr
    log = tmp_path / "run.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen([*TUNNEL, "run", str(path)], stderr=log_file)
    try:
        content = wait_for_line(log, "certificate expires soon", process)
        assert "soon.crt expires in 9 days" in content
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
