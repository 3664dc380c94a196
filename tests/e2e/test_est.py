"""`tunnel ca serve` / `token` / `enroll` as real processes, and clients no one here wrote
(curl, openssl) speaking EST (RFC 7030) to it."""

from __future__ import annotations

import base64
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

TUNNEL = [sys.executable, "-m", "tunnel.cli"]


def run(*args: str | Path, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*map(str, args)], cwd=cwd, capture_output=True, timeout=60, check=False, input=stdin)


def tunnel(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return run(*TUNNEL, *args, cwd=cwd)


class Server:
    def __init__(self, cwd: Path) -> None:
        self.log_path = cwd / "serve.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*TUNNEL, "ca", "serve", "--dir", "ca", "--listen", "127.0.0.1:0"], cwd=cwd, stderr=self._log
        )
        match = self.wait_for(r"on 127\.0\.0\.1:(\d+) \(anchor sha256 ([0-9a-f]{64})\)")
        self.port, self.fingerprint = int(match.group(1)), match.group(2)
        self.url = f"https://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.log())):
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{pattern!r} not logged:\n{self.log()}"
            time.sleep(0.02)
        return match

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    assert tunnel("ca", "init", "--dir", "ca", cwd=tmp_path).returncode == 0
    started = Server(tmp_path)
    yield started
    started.close()


def enroll(tmp: Path, server: Server, name: str, *kind: str) -> Path:
    token = tunnel("ca", "token", "--dir", "ca", name, *(kind or ("--client",)), cwd=tmp)
    assert token.returncode == 0, token.stderr
    out = tmp / "host" / name
    result = tunnel(
        "ca", "enroll", "--url", server.url, "--token", token.stdout.decode().strip(),
        "--ca-fingerprint", server.fingerprint, "--out", out, cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def curl(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run("curl", "-sS", "--max-time", "10", "--cacert", "ca/ca.crt", *args, url, cwd=tmp)


def openssl_csr(tmp: Path, cn: str = "app1") -> bytes:
    result = run(
        "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", tmp / "new.key", "-subj", f"/CN={cn}", "-outform", "DER", cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return base64.encodebytes(result.stdout)


def reenroll_with_curl(tmp: Path, server: Server, cert: Path, key: Path, body: bytes) -> tuple[int, bytes]:
    (tmp / "csr.b64").write_bytes(body)
    result = curl(
        tmp, f"{server.url}/.well-known/est/simplereenroll",
        "--cert", str(cert), "--key", str(key), "-H", "Content-Type: application/pkcs10",
        "--data-binary", "@csr.b64", "-o", "answer", "-w", "%{http_code}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stdout), (tmp / "answer").read_bytes()


def test_token_then_enroll_end_to_end(tmp_path: Path, server: Server) -> None:
    out = enroll(tmp_path, server, "app1")
    host = out.parent
    assert host.stat().st_mode & 0o777 == 0o700
    assert (host / "app1.key").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((host / "app1.crt").read_bytes())
    anchor = x509.load_pem_x509_certificate((host / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(anchor)
    assert anchor == x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    listed = tunnel("ca", "list", "--dir", "ca", cwd=tmp_path).stdout.decode()
    assert re.search(rf"app1\s+client\s+{cert.serial_number:x}\s+\S+\s+valid", listed), listed
    assert not (tmp_path / "ca" / "app1.key").exists()  # the CA never sees the key
    server.wait_for(rf"simpleenroll issued 'app1' .*serial {cert.serial_number:x}.* to 127\.0\.0\.1:\d+ \(token")


def test_enroll_refuses_a_server_whose_ca_has_another_fingerprint(tmp_path: Path, server: Server) -> None:
    token = tunnel("ca", "token", "--dir", "ca", "app1", "--client", cwd=tmp_path).stdout.decode().strip()
    result = tunnel(
        "ca", "enroll", "--url", server.url, "--token", token, "--ca-fingerprint", "ab" * 32,
        "--out", tmp_path / "host" / "app1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert b"no CA certificate" in result.stderr
    assert b"abab" in result.stderr
    assert not (tmp_path / "host").exists()


def test_a_token_is_refused_the_second_time(tmp_path: Path, server: Server) -> None:
    token = tunnel("ca", "token", "--dir", "ca", "app1", "--client", cwd=tmp_path).stdout.decode().strip()
    args = ["ca", "enroll", "--url", server.url, "--token", token, "--ca-fingerprint", server.fingerprint]
    assert tunnel(*args, "--out", tmp_path / "a" / "app1", cwd=tmp_path).returncode == 0
    second = tunnel(*args, "--out", tmp_path / "b" / "app1", cwd=tmp_path)
    assert second.returncode == 1
    assert b"403 unknown or already used enrollment token" in second.stderr
    server.wait_for("refused: 403 unknown or already used")


def test_curl_and_openssl_read_cacerts(tmp_path: Path, server: Server) -> None:
    fetched = curl(tmp_path, f"{server.url}/.well-known/est/cacerts")
    assert fetched.returncode == 0, fetched.stderr
    decoded = run("openssl", "base64", "-d", cwd=tmp_path, stdin=fetched.stdout)
    printed = run("openssl", "pkcs7", "-inform", "DER", "-print_certs", cwd=tmp_path, stdin=decoded.stdout)
    assert printed.returncode == 0, printed.stderr
    assert x509.load_pem_x509_certificates(printed.stdout) == [
        x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    ]


def test_curl_reenrolls_with_an_openssl_csr(tmp_path: Path, server: Server) -> None:
    out = enroll(tmp_path, server, "app1", "--client", "--dns", "app1.internal")
    current = x509.load_pem_x509_certificate(out.with_suffix(".crt").read_bytes())
    status, body = reenroll_with_curl(
        tmp_path, server, out.with_suffix(".crt"), out.with_suffix(".key"), openssl_csr(tmp_path)
    )
    assert status == 200, body
    (new,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    assert new.serial_number != current.serial_number
    assert new.subject == current.subject
    assert (
        new.not_valid_after_utc - new.not_valid_before_utc == current.not_valid_after_utc - current.not_valid_before_utc
    )
    san = x509.SubjectAlternativeName
    assert new.extensions.get_extension_for_class(san) == current.extensions.get_extension_for_class(san)
    # the renewed certificate renews in turn
    (tmp_path / "renewed.crt").write_bytes(new.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "new.key").rename(tmp_path / "renewed.key")
    renewed = (tmp_path / "renewed.crt", tmp_path / "renewed.key")
    status, _ = reenroll_with_curl(tmp_path, server, *renewed, openssl_csr(tmp_path))
    assert status == 200


def test_a_server_certificate_renews_too(tmp_path: Path, server: Server) -> None:
    out = enroll(tmp_path, server, "db", "--server", "--dns", "db.internal")
    status, body = reenroll_with_curl(
        tmp_path, server, out.with_suffix(".crt"), out.with_suffix(".key"), openssl_csr(tmp_path, "db")
    )
    assert status == 200, body


def test_a_revoked_certificate_cannot_reenroll(tmp_path: Path, server: Server) -> None:
    out = enroll(tmp_path, server, "app1")
    assert tunnel("ca", "revoke", "--dir", "ca", "app1", cwd=tmp_path).returncode == 0
    status, body = reenroll_with_curl(
        tmp_path, server, out.with_suffix(".crt"), out.with_suffix(".key"), openssl_csr(tmp_path)
    )
    assert status == 403
    assert b"revoked" in body
    server.wait_for(r"simplereenroll from 127\.0\.0\.1:\d+ \(certificate 'app1'.*refused: 403 .*revoked")


def test_a_client_of_another_ca_is_refused_in_the_handshake_and_the_service_goes_on(
    tmp_path: Path, server: Server
) -> None:
    assert tunnel("ca", "init", "--dir", "other", cwd=tmp_path).returncode == 0
    assert tunnel("ca", "issue", "--dir", "other", "app1", "--client", cwd=tmp_path).returncode == 0
    status = curl(
        tmp_path, f"{server.url}/.well-known/est/simplereenroll",
        "--cert", "other/app1.crt", "--key", "other/app1.key", "-H", "Content-Type: application/pkcs10",
        "--data-binary", "x", "-o", "/dev/null", "-w", "%{http_code}",
    )  # fmt: skip
    assert status.returncode != 0 or status.stdout == b"000"
    server.wait_for("TLS handshake refused")
    assert curl(tmp_path, f"{server.url}/.well-known/est/cacerts").returncode == 0


def test_bad_requests_get_clear_statuses_and_the_service_goes_on(tmp_path: Path, server: Server) -> None:
    out = enroll(tmp_path, server, "app1")
    cert, key = str(out.with_suffix(".crt")), str(out.with_suffix(".key"))
    (tmp_path / "big").write_bytes(b"A" * (65 * 1024))
    cases = [
        (["-H", "Content-Type: application/pkcs10", "--data-binary", "@big"], "413"),
        (["-H", "Content-Type: text/plain", "--data-binary", "x"], "415"),
        (["-H", "Content-Type: application/pkcs10", "--data-binary", "%%%"], "400"),
    ]
    for args, expected in cases:
        result = curl(
            tmp_path, f"{server.url}/.well-known/est/simplereenroll",
            "--cert", cert, "--key", key, *args, "-o", "/dev/null", "-w", "%{http_code}",
        )  # fmt: skip
        assert result.stdout.decode() == expected, (args, result.stderr)
    unauthenticated = curl(
        tmp_path, f"{server.url}/.well-known/est/simpleenroll",
        "-H", "Content-Type: application/pkcs10", "--data-binary", openssl_csr(tmp_path).decode(),
        "-o", "/dev/null", "-w", "%{http_code}",
    )  # fmt: skip
    assert unauthenticated.stdout == b"401"
    server.wait_for("refused by the HTTP layer")
    server.wait_for("refused: 415")
    assert curl(tmp_path, f"{server.url}/.well-known/est/cacerts").returncode == 0


def test_silent_clients_are_dropped_and_do_not_hold_up_others(tmp_path: Path, server: Server) -> None:
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]  # past the cap of 16
    try:
        started = time.monotonic()
        fetched = curl(tmp_path, f"{server.url}/.well-known/est/cacerts")
        assert fetched.returncode == 0, fetched.stderr  # waited for a slot: the silent ones time out
        assert time.monotonic() - started < 10
        server.wait_for("no TLS handshake within")
        quiet = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.crt"))
        with (
            socket.create_connection(("127.0.0.1", server.port)) as raw,
            quiet.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            server.wait_for("no whole request within", timeout=10)
    finally:
        for each in silent:
            each.close()
