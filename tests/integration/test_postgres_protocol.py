"""protocol: postgres, spoken byte by byte by a test client (the real psql, pgbench and
PostgreSQL are in tests/system/test_postgres.py): SSLRequest, GSSENCRequest, direct TLS
with ALPN, and plaintext refused with an ErrorResponse, at a server tunnel; 'N' to the
application and SSLRequest towards the server, at a client tunnel."""

from __future__ import annotations

import logging
import ssl
import struct
from pathlib import Path

import pytest
import trio

from tests.helpers import (
    PKI,
    Backend,
    backend,
    client_doc,
    echo,
    read_until_closed,
    running_tunnel,
    server_doc,
    tcp_connect,
    write_yaml,
)
from tunnel import postgres

_PARAMETERS = b"user\0ann\0\0"
STARTUP = struct.pack("!II", 8 + len(_PARAMETERS), 196608) + _PARAMETERS  # a StartupMessage, protocol 3.0
GSSENC_REQUEST = struct.pack("!II", 8, postgres.GSSENC_REQUEST_CODE)


def _context(p: PKI, *, alpn: bool) -> ssl.SSLContext:
    ctx = p.client_context("app1")
    if alpn:
        ctx.set_alpn_protocols(["postgresql"])
    return ctx


async def _tls_after(stream: trio.SocketStream, p: PKI, *, alpn: bool = True) -> trio.SSLStream[trio.SocketStream]:
    tls = trio.SSLStream(stream, _context(p, alpn=alpn), server_hostname="localhost")
    await tls.do_handshake()
    return tls


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def test_a_server_tunnel_answers_sslrequest_with_s_then_relays_over_tls(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(path) as (_, address):
            tcp = await tcp_connect(address)
            await tcp.send_all(postgres.SSL_REQUEST)
            assert await tcp.receive_some(1) == b"S"
            tls = await _tls_after(tcp, pki_files)
            await tls.send_all(STARTUP)
            assert await _read_exactly(tls, len(STARTUP)) == STARTUP  # the target saw plain bytes
            await tls.aclose()


async def test_a_server_tunnel_answers_gssencrequest_with_n_and_then_takes_sslrequest(
    pki_files: PKI, tmp_path: Path
) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(path) as (_, address):
            tcp = await tcp_connect(address)
            await tcp.send_all(GSSENC_REQUEST)
            assert await tcp.receive_some(1) == b"N"
            await tcp.send_all(postgres.SSL_REQUEST)
            assert await tcp.receive_some(1) == b"S"
            tls = await _tls_after(tcp, pki_files)
            await tls.send_all(b"ping")
            assert await _read_exactly(tls, 4) == b"ping"
            await tls.aclose()


async def test_a_plaintext_startup_message_gets_an_error_response_and_never_reaches_the_target(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(path) as (_, address):
            tcp = await tcp_connect(address)
            await tcp.send_all(STARTUP)
            reply = await read_until_closed(tcp)  # a FIN after the reply, not a reset
            await tcp.aclose()
        assert target.accepted == 0
    assert reply.startswith(b"E")
    assert b"SFATAL\0" in reply
    assert b"C28000\0" in reply
    assert postgres.TLS_REQUIRED.encode() in reply
    assert any("refused: no TLS (a PostgreSQL StartupMessage in plaintext)" in r.getMessage() for r in caplog.records)


async def test_a_plaintext_cancel_request_gets_an_error_response(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(path) as (_, address):
            tcp = await tcp_connect(address)
            await tcp.send_all(struct.pack("!IIII", 16, postgres.CANCEL_REQUEST_CODE, 1234, 5678))
            reply = await read_until_closed(tcp)
            await tcp.aclose()
        assert target.accepted == 0
    assert reply.startswith(b"E")
    assert postgres.TLS_REQUIRED.encode() in reply


async def test_direct_tls_with_alpn_postgresql_is_served(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(path) as (_, address):
            tls = await _tls_after(await tcp_connect(address), pki_files)
            assert tls.selected_alpn_protocol() == "postgresql"
            await tls.send_all(STARTUP)
            assert await _read_exactly(tls, len(STARTUP)) == STARTUP
            await tls.aclose()


async def test_direct_tls_without_alpn_is_refused_before_the_target_is_dialled(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(path) as (_, address):
            tls = await _tls_after(await tcp_connect(address), pki_files, alpn=False)
            try:
                await tls.send_all(STARTUP)
                got = await read_until_closed(tls)
            except trio.BrokenResourceError:
                got = b""
            assert got == b""
            await tls.aclose()
        assert target.accepted == 0
    assert any("refused: no ALPN" in r.getMessage() for r in caplog.records)


async def test_a_server_tunnel_without_protocol_postgres_takes_no_sslrequest(pki_files: PKI, tmp_path: Path) -> None:
    """protocol: tcp (the default) stays what it was: the first bytes are TLS."""
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            tcp = await tcp_connect(address)
            await tcp.send_all(postgres.SSL_REQUEST)
            assert b"S" not in await read_until_closed(tcp)
            await tcp.aclose()
        assert target.accepted == 0


async def test_a_client_tunnel_answers_the_applications_sslrequest_with_n_and_speaks_tls_to_the_server(
    pki_files: PKI, tmp_path: Path
) -> None:
    async with backend(echo) as target:
        server = write_yaml(tmp_path / "s.yaml", server_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(server) as (_, server_address):
            client = write_yaml(tmp_path / "c.yaml", client_doc(pki_files, server_address, protocol="postgres"))
            async with running_tunnel(client) as (_, client_address):
                app = await tcp_connect(client_address)
                await app.send_all(postgres.SSL_REQUEST)  # libpq's sslmode=prefer
                assert await app.receive_some(1) == b"N"
                await app.send_all(STARTUP + b"more")
                assert await _read_exactly(app, len(STARTUP) + 4) == STARTUP + b"more"
                await app.aclose()


@pytest.mark.parametrize("reply", [b"N", b"E", b""])
async def test_a_client_tunnel_refuses_a_server_that_does_not_answer_s_and_sends_nothing_in_plaintext(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, reply: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    done = trio.Event()

    async def no_tls(stream: trio.SocketStream, state: Backend) -> None:
        state.received.append(await _read_exactly(stream, 8))
        if not reply:  # it closes without a word
            state.received.append(b"")
            done.set()
            return
        await stream.send_all(reply)
        state.received.append(await read_until_closed(stream))
        done.set()

    async with backend(no_tls) as target:
        client = write_yaml(tmp_path / "c.yaml", client_doc(pki_files, target.address, protocol="postgres"))
        async with running_tunnel(client) as (_, client_address):
            app = await tcp_connect(client_address)
            await app.send_all(STARTUP)
            assert await read_until_closed(app) == b""
            await app.aclose()
            with trio.fail_after(5):
                await done.wait()
    assert target.received == [postgres.SSL_REQUEST, b""]
    assert any("refused: server" in r.getMessage() and "no TLS at the server" in r.getMessage() for r in caplog.records)
