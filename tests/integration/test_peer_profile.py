"""Certificates no peer may present, whatever `allow` says (identity.profile_refusal): a CA
certificate (basicConstraints CA:TRUE) and a subject with several CNs. Refused after a real
handshake in both modes, the reason logged, the target never dialled; and refused up front
as a tunnel's own certificate."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import (
    PKI,
    backend,
    client_doc,
    echo,
    issue_odd,
    make_pki,
    read_until_closed,
    running_tunnel,
    server_doc,
    tcp_connect,
    write_yaml,
)
from tunnel.config import ConfigError, load_file
from tunnel.state import TunnelState


@pytest.fixture(scope="module")
def p(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """make_pki's CA, plus what it signs that no peer may present."""
    pki = make_pki(tmp_path_factory.mktemp("profile"))
    issue_odd(pki.dir, "ca-client", ca=True)
    issue_odd(pki.dir, "two-cns", cns=["app1", "admin"])
    issue_odd(pki.dir, "three-cns", cns=["admin", "app1", "app1"])
    issue_odd(pki.dir, "ca-server", kind="server", ca=True)
    issue_odd(pki.dir, "two-cns-server", kind="server", cns=["localhost", "other"])
    return pki


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]


async def wait_for_refusal(caplog: pytest.LogCaptureFixture) -> str:
    with trio.fail_after(5):
        while not refusals(caplog):  # noqa: ASYNC110
            await trio.sleep(0.01)
    return refusals(caplog)[0]


@pytest.mark.parametrize(
    ("client", "allow", "reason"),
    [
        ("ca-client", {"cn": ["ca-client"]}, "peer certificate is a CA"),
        ("ca-client", {"any": True}, "peer certificate is a CA"),
        ("two-cns", {"cn": ["app1"]}, "ambiguous identity: 2 common names"),  # the first CN
        ("two-cns", {"cn": ["admin"]}, "ambiguous identity: 2 common names"),  # the last CN
        ("two-cns", {"any": True}, "ambiguous identity: 2 common names"),
        ("three-cns", {"fingerprint": "three-cns"}, "ambiguous identity: 3 common names"),
    ],
)
async def test_a_server_tunnel_refuses_a_client_certificate_no_peer_may_present(
    p: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, client: str, allow: dict[str, Any], reason: str
) -> None:
    if "fingerprint" in allow:
        allow = {"fingerprint": [p.fingerprint(allow["fingerprint"])]}
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(p, target.address, allow=allow))
        async with running_tunnel(path) as (_, address):
            host, _, port = address.rpartition(":")
            tcp = await trio.open_tcp_stream(host, int(port))
            stream = trio.SSLStream(tcp, p.client_context(client), server_hostname="localhost")
            with trio.fail_after(5):
                await stream.do_handshake()  # TLS 1.3: the client's side completes first
                with pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some()
            await tcp.aclose()
            refused = await wait_for_refusal(caplog)
    assert target.accepted == 0, "a refused client must never cost the target a connection"
    assert refused.startswith(f"refused: {reason} tunnel=s peer=127.0.0.1:"), refused


@asynccontextmanager
async def tls_server(p: PKI, name: str, received: list[bytes]) -> AsyncIterator[str]:
    """A plain TLS echo server (the stdlib's, no tunnel) presenting `name`; what it reads
    goes into `received`. Yields its address."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(p.crt(name), p.key(name))
    ctx.load_verify_locations(p.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            async for data in stream:
                received.append(bytes(data))
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            await tcp.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield f"127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("server", "reason"),
    [("ca-server", "peer certificate is a CA"), ("two-cns-server", "ambiguous identity: 2 common names")],
)
async def test_a_client_tunnel_refuses_a_server_certificate_no_peer_may_present(
    p: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, server: str, reason: str
) -> None:
    received: list[bytes] = []
    async with tls_server(p, "server", received) as good, tls_server(p, server, received) as bad:
        # Control: the same client tunnel and application get through to a normal server.
        path = write_yaml(tmp_path / "good.yaml", client_doc(p, good))
        async with running_tunnel(path) as (_, address), await tcp_connect(address) as app:
            with trio.fail_after(5):
                await app.send_all(b"hello")
                assert await app.receive_some() == b"hello"
        assert received == [b"hello"]
        caplog.clear()

        path = write_yaml(tmp_path / "c.yaml", client_doc(p, bad))
        async with running_tunnel(path) as (_, address), await tcp_connect(address) as app:
            with trio.fail_after(5):
                await app.send_all(b"secret")
                assert await read_until_closed(app) == b""
            refused = await wait_for_refusal(caplog)
    assert received == [b"hello"], "nothing of the application's may reach a refused server"
    assert refused.startswith(f"refused: server {bad}: {reason} tunnel=c peer="), refused
    assert not any(r.getMessage().startswith("opened") for r in caplog.records if r.levelno >= logging.INFO)


@pytest.mark.parametrize(
    ("mode", "cert", "reason"),
    [
        ("server", "ca-server", "peer certificate is a CA"),
        ("client", "ca-client", "peer certificate is a CA"),
        ("client", "two-cns", "ambiguous identity: 2 common names"),
    ],
)
def test_a_tunnel_whose_own_certificate_no_peer_would_accept_is_a_config_error(
    p: PKI, tmp_path: Path, mode: str, cert: str, reason: str
) -> None:
    doc = server_doc(p, "127.0.0.1:9") if mode == "server" else client_doc(p, "127.0.0.1:9")
    doc["tls"]["cert"], doc["tls"]["key"] = str(p.crt(cert)), str(p.key(cert))
    config = load_file(write_yaml(tmp_path / f"{mode}.yaml", doc))
    with pytest.raises(ConfigError) as info:
        TunnelState.build(config)
    assert info.value.key == "tls.cert"
    assert f"{p.crt(cert)}: {reason}: a peer tunnel would refuse" in info.value.message
