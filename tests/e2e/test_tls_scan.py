"""An outside view of the TLS policy: the sslyze scanner against a real `tunnel run` server.

sslyze lives in its own virtualenv (.venv-sslyze, made by .ci/run; its pins may clash with
the project's), or wherever $SSLYZE points. Missing: the tests skip, or fail under CI=true
(the convention of the system tests, whose `system` marker these tests carry too).

Two scans per server certificate type (EC and RSA):

* with the client certificate app1, so the scanner completes mutual-TLS handshakes and its
  renegotiation, ROBOT, CCS and fallback probes see a whole handshake (the tunnel logs the
  connections as `identity=cn=app1`); sslyze then reports client authentication as
  "DISABLED", since it never had to decline a certificate request;
* without a certificate, only to read sslyze's own verdict on client authentication.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PKI, free_port, server_doc, write_yaml
from tests.process import DaemonProcess, EchoTarget
from tests.system.services import system_tests_required
from tunnel import pki

pytestmark = pytest.mark.system  # needs third-party software: sslyze

REPO = Path(__file__).resolve().parents[2]
SCAN_TIMEOUT = 90.0

# Everything the policy is about; the certificate checks are left out.
SCAN_COMMANDS = [
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--compression",
    "--reneg",
    "--heartbleed",
    "--robot",
    "--openssl_ccs",
    "--fallback",
    "--elliptic_curves",
]
OLD_VERSIONS = ["ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"]
# Forward-secret key exchange, AEAD cipher, no SHA-1 MAC: Mozilla "intermediate" for TLS 1.2.
TLS12_ALLOWED = re.compile(
    r"TLS_(ECDHE|DHE)_(ECDSA|RSA)_WITH_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20_POLY1305_SHA256)"
)
TLS12_AUTH = {"ec": "ECDSA", "rsa": "RSA"}
# tunnel.tls.GROUPS in sslyze's names. (sslyze tries elliptic curves only; the
# finite-field groups, ffdhe2048 to ffdhe8192, are refused in tests/unit/test_tls_policy.py.)
ACCEPTED_CURVES = {"X25519", "secp256r1", "secp384r1"}


def sslyze() -> str:
    """The sslyze executable: $SSLYZE, else .venv-sslyze/bin/sslyze in the repository."""
    configured = os.environ.get("SSLYZE", "").strip()
    path = Path(configured) if configured else REPO / ".venv-sslyze" / "bin" / "sslyze"
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    message = (
        f"sslyze not found at {path}: python3 -m venv .venv-sslyze && "
        ".venv-sslyze/bin/pip install sslyze (or set SSLYZE=/path/to/sslyze)"
    )
    if system_tests_required():
        pytest.fail(f"{message} [CI=true or TUNNEL_REQUIRE_SYSTEM=1: refusing to skip]")
    pytest.skip(message)


@dataclass(frozen=True)
class Scan:
    """What the scans found about one running server tunnel."""

    key_type: str
    port: int
    pki: PKI
    results: dict[str, Any]  # scan command → its "result" (every command COMPLETED)
    client_auth: str  # connectivity_result.client_auth_requirement of the scan without a certificate
    seconds: float  # wall time of both sslyze runs
    log: str  # the tunnel's log after the scans

    def accepted(self, command: str) -> list[str]:
        return [suite["cipher_suite"]["name"] for suite in self.results[command]["accepted_cipher_suites"]]

    def curves(self) -> set[str]:
        return {curve["name"] for curve in self.results["elliptic_curves"]["supported_curves"] or []}

    def summary(self) -> str:
        lines = [f"sslyze against a server tunnel with an {self.key_type.upper()} certificate ({self.seconds:.1f}s):"]
        for command in [*OLD_VERSIONS, "tls_1_2_cipher_suites", "tls_1_3_cipher_suites"]:
            version = command.removesuffix("_cipher_suites")
            lines.append(f"  {version}: {', '.join(self.accepted(command)) or 'none accepted'}")
        reneg = self.results["session_renegotiation"]
        lines += [
            f"  compression: {self.results['tls_compression']['supports_compression']}",
            f"  secure renegotiation: {reneg['supports_secure_renegotiation']}, "
            f"client renegotiations accepted: {reneg['client_renegotiations_success_count']}",
            f"  heartbleed: {self.results['heartbleed']['is_vulnerable_to_heartbleed']}, "
            f"ccs injection: {self.results['openssl_ccs_injection']['is_vulnerable_to_ccs_injection']}, "
            f"robot: {self.results['robot']['robot_result']}",
            f"  fallback scsv: {self.results['tls_fallback_scsv']['supports_fallback_scsv']}",
            f"  key exchange curves: {', '.join(sorted(self.curves()))}",
            f"  client authentication: {self.client_auth}",
        ]
        return "\n".join(lines)


def _make_pki(root: Path, key_type: str) -> PKI:
    ca_dir = root / "ca"
    pki.init_ca(ca_dir, name=f"scan CA ({key_type})", key_type=key_type)
    pki.issue(ca_dir, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"])
    pki.issue(ca_dir, "app1", kind="client")
    return PKI(dir=ca_dir, other=root / "other")


def _run_sslyze(tool: str, port: int, out: Path, *args: str) -> dict[str, Any]:
    """One sslyze run against 127.0.0.1:port; its one server result, connectivity checked."""
    command = [tool, "--quiet", "--mozilla_config=disable", f"--json_out={out}", *args, f"127.0.0.1:{port}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SCAN_TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    document = json.loads(out.read_text())
    [server] = document["server_scan_results"]
    assert server["connectivity_status"] == "COMPLETED", server["connectivity_error_trace"]
    assert server["scan_status"] == "COMPLETED", server
    result: dict[str, Any] = server
    return result


@pytest.fixture(scope="module", params=["ec", "rsa"])
def scan(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scan]:
    key_type: str = request.param
    tool = sslyze()
    tmp = tmp_path_factory.mktemp(f"scan-{key_type}")
    p = _make_pki(tmp, key_type)
    target = EchoTarget()
    port = free_port()
    config = write_yaml(tmp / "server.yaml", server_doc(p, target.address, listen=f"127.0.0.1:{port}"))
    daemon = DaemonProcess(tmp, str(config))
    try:
        daemon.wait_for("ready tunnels=1")
        started = time.monotonic()
        with_cert = _run_sslyze(
            tool,
            port,
            tmp / "with-cert.json",
            "--cert",
            str(p.crt("app1")),
            "--key",
            str(p.key("app1")),
            *SCAN_COMMANDS,
        )
        without_cert = _run_sslyze(tool, port, tmp / "without-cert.json", "--tlsv1_3")
        seconds = time.monotonic() - started
        results: dict[str, Any] = {}
        for command, outcome in with_cert["scan_result"].items():
            if outcome["status"] == "NOT_SCHEDULED":
                continue
            assert outcome["status"] == "COMPLETED", f"sslyze {command}: {outcome['error_reason']}\n{outcome}"
            results[command] = outcome["result"]
        yield Scan(
            key_type=key_type,
            port=port,
            pki=p,
            results=results,
            client_auth=without_cert["connectivity_result"]["client_auth_requirement"],
            seconds=seconds,
            log=daemon.log(),
        )
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.close()
        target.close()


def test_scan_summary(scan: Scan, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a check: puts what the scanner saw in the test output, for the record."""
    with capsys.disabled():
        print("\n" + scan.summary())
    assert "identity=cn=app1" in scan.log, f"the scanner never completed a mutual-TLS handshake:\n{scan.log}"


def test_no_protocol_older_than_tls_1_2(scan: Scan) -> None:
    for command in OLD_VERSIONS:
        assert not scan.results[command]["is_tls_version_supported"], scan.summary()
        assert scan.accepted(command) == [], scan.summary()


def test_tls_1_2_only_forward_secret_aead_suites(scan: Scan) -> None:
    accepted = scan.accepted("tls_1_2_cipher_suites")
    assert accepted, scan.summary()
    for suite in accepted:
        assert TLS12_ALLOWED.fullmatch(suite), f"{suite} is not ECDHE/DHE with AES-GCM or ChaCha20\n{scan.summary()}"
        assert f"_{TLS12_AUTH[scan.key_type]}_WITH_" in suite, f"{suite}: not the certificate's type\n{scan.summary()}"
    # No static RSA key exchange, in the scanner's own words too.
    assert scan.results["robot"]["robot_result"] == "NOT_VULNERABLE_RSA_NOT_SUPPORTED", scan.summary()


def test_tls_1_3_accepted(scan: Scan) -> None:
    assert scan.results["tls_1_3_cipher_suites"]["is_tls_version_supported"], scan.summary()
    assert scan.accepted("tls_1_3_cipher_suites"), scan.summary()


def test_no_compression(scan: Scan) -> None:
    assert scan.results["tls_compression"]["supports_compression"] is False, scan.summary()


def test_no_insecure_or_client_initiated_renegotiation(scan: Scan) -> None:
    reneg = scan.results["session_renegotiation"]
    # RFC 5746 signalling present: no insecure (legacy) renegotiation.
    assert reneg["supports_secure_renegotiation"] is True, scan.summary()
    assert reneg["is_vulnerable_to_client_renegotiation_dos"] is False, scan.summary()
    assert reneg["client_renegotiations_success_count"] == 0, scan.summary()


def test_not_vulnerable_to_known_attacks(scan: Scan) -> None:
    assert scan.results["heartbleed"]["is_vulnerable_to_heartbleed"] is False, scan.summary()
    assert scan.results["openssl_ccs_injection"]["is_vulnerable_to_ccs_injection"] is False, scan.summary()
    assert scan.results["robot"]["robot_result"].startswith("NOT_VULNERABLE"), scan.summary()
    assert scan.results["tls_fallback_scsv"]["supports_fallback_scsv"] is True, scan.summary()


def test_key_exchange_only_over_x25519_p256_and_p384(scan: Scan) -> None:
    """Not X448 nor P-521, nor any binary curve: tunnel.tls.GROUPS (sslyze tries them with TLS 1.3)."""
    assert scan.results["elliptic_curves"]["supports_ecdh_key_exchange"] is True, scan.summary()
    assert scan.curves() == ACCEPTED_CURVES, scan.summary()
    rejected = {curve["name"] for curve in scan.results["elliptic_curves"]["rejected_curves"]}
    assert {"X448", "secp521r1"} <= rejected, scan.summary()


def test_client_certificate_required(scan: Scan) -> None:
    assert scan.client_auth == "REQUIRED", scan.summary()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_handshake_without_client_certificate_fails(scan: Scan, version: ssl.TLSVersion) -> None:
    """The stdlib's view: no certificate, no tunnel. With TLS 1.3 the client's side of the
    handshake completes before the server has seen its (missing) certificate; the refusal,
    a certificate_required alert, arrives on the first read. (Read, don't write: the tunnel
    resets the connection after its alert, and a write meeting that reset fails with an
    EOF error before the alert waiting in the socket is ever read.)"""
    ctx = scan.pki.client_context("")
    ctx.minimum_version = ctx.maximum_version = version
    expected = "SSLV3_ALERT_HANDSHAKE_FAILURE" if version == ssl.TLSVersion.TLSv1_2 else "CERTIFICATE_REQUIRED"
    with pytest.raises(ssl.SSLError, match=expected):
        _exchange(ctx, scan.port, b"")
    # The same client with a certificate gets through: the refusal above was about the certificate.
    ctx = scan.pki.client_context("app1")
    ctx.minimum_version = ctx.maximum_version = version
    assert _exchange(ctx, scan.port, b"ping") == b"ping"


def _exchange(ctx: ssl.SSLContext, port: int, data: bytes) -> bytes:
    """Handshake, send `data` (if any), read what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            if data:
                tls.sendall(data)
            return tls.recv(100)
