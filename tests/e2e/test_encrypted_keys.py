"""Encrypted private keys (tls.key_password_file, `ca issue --key-password-file`): the real
CLI as subprocesses, some of them on a pseudo-terminal, since that is where OpenSSL prompts
for a key's password (it opens /dev/tty) when nobody gives it one."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.helpers import PKI, free_port, make_pki, server_doc, write_yaml
from tests.process import TUNNEL, DaemonProcess, EchoTarget, echo_once, tls_client
from tunnel import pki

# Runs a command as the leader of a new session whose controlling terminal is the pty on
# its stdin, as a login shell would: without that OpenSSL finds no /dev/tty to prompt on.
_ON_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"
)


def _popen_on_terminal(args: list[str], *, stderr: Any = None) -> tuple[subprocess.Popen[bytes], int]:
    """`args` on a new pseudo-terminal (its controlling terminal); returns the process and
    the pty's master end (the caller closes it)."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _ON_TERMINAL, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave if stderr is None else stderr,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    return process, master


def on_terminal(*args: str, timeout: float = 10.0) -> tuple[int | None, str]:
    """Run `tunnel ARGS` on a pseudo-terminal: (exit status, or None if it was still running
    after `timeout` seconds and had to be killed; everything it wrote to the terminal)."""
    process, master = _popen_on_terminal([*TUNNEL, *args])
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([master], [], [], min(left, 0.1))
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other end is gone
                    chunk = b""
                output += chunk
                if not chunk and process.poll() is not None:
                    break
            elif process.poll() is not None:
                break
        status = process.poll()
        if status is None:
            process.kill()
        process.wait()
    finally:
        os.close(master)
    return status, output.decode(errors="replace")


def encrypt_key(path: Path, password: bytes, *, legacy: bool = False) -> None:
    """Rewrite the PEM key at `path` encrypted: PKCS#8 (`BEGIN ENCRYPTED PRIVATE KEY`) or
    the legacy OpenSSL form (`Proc-Type: 4,ENCRYPTED`)."""
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    form = serialization.PrivateFormat.TraditionalOpenSSL if legacy else serialization.PrivateFormat.PKCS8
    pem = key.private_bytes(serialization.Encoding.PEM, form, serialization.BestAvailableEncryption(password))
    path.write_bytes(pem)


@pytest.fixture
def own_pki(tmp_path: Path) -> PKI:
    """A CA of this test's own: these tests encrypt and re-issue its keys."""
    return make_pki(tmp_path / "pki")


def server_file(p: PKI, tmp: Path, target: str, port: int = 0, *, password_file: Path | None = None) -> Path:
    doc = server_doc(p, target, listen=f"127.0.0.1:{port}")
    doc["allow"] = {"cn": ["app1"]}
    if password_file is not None:
        doc["tls"]["key_password_file"] = str(password_file)
    return write_yaml(tmp / "server.yaml", doc)


def password_file(tmp: Path, text: str, name: str = "key.pass") -> Path:
    path = tmp / name
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- never a prompt ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("legacy", [False, True], ids=["pkcs8", "legacy-pem"])
def test_an_encrypted_key_without_a_password_file_fails_at_once_on_a_terminal(
    own_pki: PKI, tmp_path: Path, command: str, legacy: bool
) -> None:
    encrypt_key(own_pki.key("server"), b"s3cret", legacy=legacy)
    path = server_file(own_pki, tmp_path, "127.0.0.1:6379")
    status, output = on_terminal(command, str(path))
    assert status == 2, f"still waiting for a password after 10s (status {status}):\n{output}"
    assert f"error: {path}: tls.key: {own_pki.key('server')}: the key is encrypted: set tls.key_password_file" in output
    assert "pass phrase" not in output


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_wrong_key_password_fails_at_once_on_a_terminal(own_pki: PKI, tmp_path: Path, command: str) -> None:
    encrypt_key(own_pki.key("server"), b"s3cret")
    path = server_file(own_pki, tmp_path, "127.0.0.1:6379", password_file=password_file(tmp_path, "guess\n"))
    status, output = on_terminal(command, str(path))
    assert status == 2, f"still waiting after 10s (status {status}):\n{output}"
    key = own_pki.key("server")
    assert f"error: {path}: tls.key: cannot decrypt {key}: wrong password (tls.key_password_file)" in output
    assert "pass phrase" not in output


@pytest.mark.parametrize("content", ["s3cret", "s3cret\n", "s3cret\r\n"])
def test_check_accepts_an_encrypted_key_with_its_password_file(own_pki: PKI, tmp_path: Path, content: str) -> None:
    encrypt_key(own_pki.key("server"), b"s3cret")
    path = server_file(own_pki, tmp_path, "127.0.0.1:6379", password_file=password_file(tmp_path, content))
    status, output = on_terminal("check", str(path))
    assert status == 0, output
    assert f"ok: {path}" in output
    assert "warning" not in output


@pytest.mark.parametrize("content", ["", "\n", "\r\n"])
def test_an_empty_key_password_file_is_an_error(own_pki: PKI, tmp_path: Path, content: str) -> None:
    encrypt_key(own_pki.key("server"), b"s3cret")
    secret = password_file(tmp_path, content)
    path = server_file(own_pki, tmp_path, "127.0.0.1:6379", password_file=secret)
    status, output = on_terminal("check", str(path))
    assert status == 2, output
    assert f"error: {path}: tls.key_password_file: {secret} is empty" in output


def test_a_key_password_file_every_user_can_read_is_refused(own_pki: PKI, tmp_path: Path) -> None:
    encrypt_key(own_pki.key("server"), b"s3cret")
    secret = password_file(tmp_path, "s3cret\n")
    secret.chmod(0o644)
    path = server_file(own_pki, tmp_path, "127.0.0.1:6379", password_file=secret)
    result = subprocess.run([*TUNNEL, "check", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"error: {path}: tls.key_password_file: {secret} is readable by every user (mode 0644)" in result.stderr


# -- tunnel ca issue --key-password-file -------------------------------------------------


def test_ca_issue_encrypts_the_key_and_the_tunnel_runs_with_it(
    tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    def tunnel(*args: str) -> str:
        result = subprocess.run([*TUNNEL, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout

    secret = password_file(tmp_path, "correct horse\n")
    tunnel("ca", "init")
    tunnel("ca", "issue", "server", "--server", "--dns", "localhost", "--key-password-file", str(secret))
    tunnel("ca", "issue", "app1", "--client")
    certs = tmp_path / "certs"
    key_pem = (certs / "server.key").read_bytes()
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, None)
    key = serialization.load_pem_private_key(key_pem, b"correct horse")  # the newline is not part of it
    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    assert key.public_key() == cert.public_key()
    assert (certs / "app1.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    p = PKI(dir=certs, other=certs)
    port = free_port()
    path = server_file(p, tmp_path, target.address, port, password_file=secret)
    daemon = DaemonProcess(tmp_path, str(path))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    with tls_client(p, port, "app1") as conn:
        assert echo_once(conn, b"through") == b"through"
    assert daemon.stop() == 0


@pytest.mark.parametrize("content", ["", "\n"])
def test_ca_issue_refuses_an_empty_key_password_file(tmp_path: Path, content: str) -> None:
    pki.init_ca(tmp_path / "certs")
    secret = password_file(tmp_path, content)
    result = subprocess.run(
        [*TUNNEL, "ca", "issue", "server", "--server", "--key-password-file", str(secret)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"{secret} is empty" in result.stderr
    assert not (tmp_path / "certs" / "server.key").exists()


# -- reload -------------------------------------------------------------------------------


def _served_serial(p: PKI, port: int) -> int:
    with tls_client(p, port, "app1") as conn:
        assert echo_once(conn, b"ping") == b"ping"
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_reload_with_a_rotated_encrypted_key_and_its_password_serves_the_new_certificate(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    secret = password_file(tmp_path, "first\n")
    encrypt_key(own_pki.key("server"), b"first")
    port = free_port()
    daemon = DaemonProcess(tmp_path, str(server_file(own_pki, tmp_path, target.address, port, password_file=secret)))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    before = _served_serial(own_pki, port)
    # rotate: a new key under a new password, and the new password
    pki.issue(
        own_pki.dir, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"], force=True, key_password=b"second"
    )
    secret.write_text("second\n")
    log = daemon.reload()
    assert "reload failed" not in log
    assert _served_serial(own_pki, port) == _serial(own_pki.crt("server")) != before
    assert daemon.stop() == 0


@pytest.mark.parametrize("password", ["wrong", None], ids=["wrong-password", "no-password-file"])
def test_reload_with_an_encrypted_key_it_cannot_open_keeps_the_old_state_serving(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess], password: str | None
) -> None:
    port = free_port()
    path = server_file(own_pki, tmp_path, target.address, port)
    daemon = DaemonProcess(tmp_path, str(path), watch_interval=0)
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    before = _served_serial(own_pki, port)
    with tls_client(own_pki, port, "app1") as open_conn:
        assert echo_once(open_conn, b"before") == b"before"
        pki.issue(
            own_pki.dir, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"], force=True, key_password=b"new"
        )
        if password is not None:
            server_file(own_pki, tmp_path, target.address, port, password_file=password_file(tmp_path, password))
        log = daemon.reload()
        expected = "wrong password (tls.key_password_file)" if password else "the key is encrypted"
        assert "reload failed, still serving the previous configuration" in log
        assert expected in log
        assert echo_once(open_conn, b"after") == b"after"
        assert _served_serial(own_pki, port) == before


def test_a_daemon_on_a_terminal_reloading_an_encrypted_key_keeps_relaying(
    own_pki: PKI, tmp_path: Path, target: EchoTarget
) -> None:
    """The observed hang: OpenSSL prompting on the daemon's terminal blocks its event loop,
    so every tunnel stops relaying until someone types."""
    port = free_port()
    path = server_file(own_pki, tmp_path, target.address, port)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log_file:
        process, master = _popen_on_terminal([*TUNNEL, "run", "--watch-interval=0", str(path)], stderr=log_file)
    try:
        deadline = time.monotonic() + 10
        while "ready tunnels=1" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        encrypt_key(own_pki.key("server"), b"s3cret")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reload failed" not in log_path.read_text():
            assert time.monotonic() < deadline, f"no reload outcome within 5s:\n{log_path.read_text()}"
            time.sleep(0.02)
        assert "the key is encrypted: set tls.key_password_file" in log_path.read_text()
        with tls_client(own_pki, port, "app1", timeout=3) as conn:
            assert echo_once(conn, b"still relaying") == b"still relaying"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def test_the_key_password_file_is_watched_for_changes(
    own_pki: PKI, tmp_path: Path, target: EchoTarget, daemons: list[DaemonProcess]
) -> None:
    secret = password_file(tmp_path, "first\n")
    encrypt_key(own_pki.key("server"), b"first")
    port = free_port()
    path = server_file(own_pki, tmp_path, target.address, port, password_file=secret)
    daemon = DaemonProcess(tmp_path, str(path))
    daemons.append(daemon)
    daemon.wait_for("ready tunnels=1")
    doc = yaml.safe_load(path.read_text())
    assert Path(doc["tls"]["key_password_file"]) == secret
    secret.write_text("changed\n")
    log = daemon.wait_for("reload failed")
    assert "wrong password (tls.key_password_file)" in log
    with tls_client(own_pki, port, "app1") as conn:
        assert echo_once(conn, b"x") == b"x"
    assert daemon.stop() == 0


def test_a_key_password_longer_than_openssl_takes_is_an_error(own_pki: PKI, tmp_path: Path) -> None:
    encrypt_key(own_pki.key("server"), b"s3cret")
    path = server_file(own_pki, tmp_path, "127.0.0.1:6379", password_file=password_file(tmp_path, "x" * 2000))
    status, output = on_terminal("check", str(path))
    assert status == 2, output
    assert f"error: {path}: tls.key_password_file: password cannot be longer than" in output
