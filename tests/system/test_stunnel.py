"""Interoperability with stunnel4 (OpenSSL) on the other end of the TLS, both ways:

* stunnel as the TLS client (with a client certificate) -> our server tunnel -> target;
* our client tunnel -> stunnel as the TLS server (requiring our certificate) -> target.

Note: ``run_stunnel`` checks readiness with one empty TCP connection per accept port,
which stunnel forwards (client mode: a full handshake with our server tunnel; server
mode: a handshake that fails), so logs and target connection counts include it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from tests.helpers import PKI
from tests.system.services import LOCALHOST, Redis, free_port, read_log, redis_cli, run_stunnel
from tests.system.tunnel_process import (
    MIB,
    HashTarget,
    address,
    big_value,
    client_doc,
    redis_get_raw,
    redis_set_from_stdin,
    run_tunnel,
    send_and_hash,
    server_doc,
)

HALF_CLOSE_PAYLOAD_SIZE = 5 * MIB


def stunnel_client_service(name: str, accept_port: int, connect_port: int, cert: Path, key: Path, ca: Path) -> str:
    """A stunnel TLS-client service that verifies our server certificate like a careful
    client would (chain and host name), presenting ``cert``."""
    return f"""
[{name}]
client = yes
accept = {LOCALHOST}:{accept_port}
connect = {LOCALHOST}:{connect_port}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
checkHost = localhost
sslVersionMin = TLSv1.2
"""


def stunnel_server_service(name: str, accept_port: int, connect: str, pki: PKI) -> str:
    """A stunnel TLS-server service that requires a client certificate from our CA."""
    return f"""
[{name}]
accept = {LOCALHOST}:{accept_port}
connect = {connect}
cert = {pki.crt("server")}
key = {pki.key("server")}
CAfile = {pki.ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.2
"""


def check_redis_big_round_trip(port: int, redis_port: int) -> None:
    value = big_value()
    assert redis_set_from_stdin(port, "big", value) == "OK"
    assert redis_get_raw(port, "big") == value
    assert redis_get_raw(redis_port, "big") == value  # really stored in redis


def test_stunnel_client_to_our_server_tunnel(redis_server: Redis, pki_files: PKI, tmp_path: Path) -> None:
    server_port, stunnel_port = free_port(), free_port()
    server = server_doc(pki_files, name="from-stunnel", port=server_port, target=address(redis_server.port))
    service = stunnel_client_service(
        "to-tunnel", stunnel_port, server_port, pki_files.crt("app1"), pki_files.key("app1"), pki_files.ca
    )
    with run_tunnel(tmp_path / "tunnel", server) as tunnel:
        with run_stunnel(tmp_path / "stunnel", service):
            assert redis_cli(stunnel_port, "ping") == "PONG"
            check_redis_big_round_trip(stunnel_port, redis_server.port)
        tunnel.wait_for_log(r"opened tunnel=from-stunnel .*identity=\S*app1")


def test_our_client_tunnel_to_stunnel_server(redis_server: Redis, pki_files: PKI, tmp_path: Path) -> None:
    stunnel_port, client_port = free_port(), free_port()
    service = stunnel_server_service("from-tunnel", stunnel_port, address(redis_server.port), pki_files)
    service = "debug = 5\n" + service  # global: log the certificates stunnel accepts
    client = client_doc(pki_files, name="to-stunnel", port=client_port, target=address(stunnel_port))
    with run_stunnel(tmp_path / "stunnel", service):
        with run_tunnel(tmp_path / "tunnel", client) as tunnel:
            assert redis_cli(client_port, "ping") == "PONG"
            check_redis_big_round_trip(client_port, redis_server.port)
            tunnel.wait_for_log(r"opened tunnel=to-stunnel .*identity=\S*server")
            assert "refused" not in tunnel.log_text()
    stunnel_log = read_log(tmp_path / "stunnel" / "stunnel.log", limit=100_000)
    # stunnel saw and checked our client certificate.
    assert re.search(r"Certificate accepted at depth=0: CN=app1", stunnel_log), stunnel_log


@pytest.mark.parametrize("direction", ["stunnel-client", "stunnel-server"])
def test_half_close_through_stunnel(direction: str, pki_files: PKI, tmp_path: Path) -> None:
    """Send 5 MiB, SHUT_WR, expect the sha256 back: the EOF must cross the TLS hop as a
    close_notify that the other implementation understands, while the reverse direction
    stays open for the reply."""
    payload = big_value(HALF_CLOSE_PAYLOAD_SIZE)
    expected = hashlib.sha256(payload).hexdigest()
    tunnel_port, stunnel_port = free_port(), free_port()
    with HashTarget() as target:
        if direction == "stunnel-client":
            # client -> stunnel (TLS client) -> our server tunnel -> target
            doc = server_doc(pki_files, name="half-in", port=tunnel_port, target=target.address)
            service = stunnel_client_service(
                "half", stunnel_port, tunnel_port, pki_files.crt("app1"), pki_files.key("app1"), pki_files.ca
            )
            entry = stunnel_port
        else:
            # client -> our client tunnel -> stunnel (TLS server) -> target
            doc = client_doc(pki_files, name="half-out", port=tunnel_port, target=address(stunnel_port))
            service = stunnel_server_service("half", stunnel_port, target.address, pki_files)
            entry = tunnel_port
        with run_tunnel(tmp_path / "tunnel", doc) as tunnel:
            with run_stunnel(tmp_path / "stunnel", service):
                got = send_and_hash(entry, payload)
                assert got == expected, (
                    f"got {got!r}\n--- tunnel log ---\n{tunnel.log_text()}"
                    f"--- stunnel log ---\n{read_log(tmp_path / 'stunnel' / 'stunnel.log')}"
                )
                # A second one on a fresh connection, to be sure it was not a fluke.
                assert send_and_hash(entry, b"second") == hashlib.sha256(b"second").hexdigest()
            # Our tunnel saw a clean end (close_notify both ways), not a reset or a cut.
            closed = tunnel.wait_for_log(rf"closed tunnel=half-\w+ .*in={len(payload)} .*")
            assert "why=both sides closed" in closed.group(0), closed.group(0)
            assert "unclean" not in closed.group(0), closed.group(0)
        assert HALF_CLOSE_PAYLOAD_SIZE in target.received


def test_stunnel_client_with_unknown_ca_is_refused(pki_files: PKI, tmp_path: Path) -> None:
    server_port, stunnel_port = free_port(), free_port()
    with HashTarget() as target:
        server = server_doc(pki_files, name="strict", port=server_port, target=target.address)
        service = stunnel_client_service(
            "stranger",
            stunnel_port,
            server_port,
            pki_files.other / "other-app1.crt",
            pki_files.other / "other-app1.key",
            pki_files.ca,  # it trusts our server; we do not trust its certificate
        )
        with run_tunnel(tmp_path / "tunnel", server) as tunnel:
            with run_stunnel(tmp_path / "stunnel", service):
                try:
                    reply = send_and_hash(stunnel_port, b"let me in", timeout=10)
                except ConnectionResetError:
                    reply = ""
                assert reply == "", reply
                tunnel.wait_for_log(r"refused: unknown CA tunnel=strict ")
            assert "opened tunnel=strict" not in tunnel.log_text()
        assert target.accepted == 0
