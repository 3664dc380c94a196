"""A client tunnel and a server tunnel back to back: plaintext in, TLS between, plaintext out."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import (
    PKI,
    Backend,
    Handler,
    backend,
    client_doc,
    echo,
    hash_then_reply,
    hostport,
    read_until_closed,
    recv_all,
    running_tunnel,
    server_doc,
    speak_first,
    tcp_connect,
    write_yaml,
)
from tunnel.config import load_file
from tunnel.metrics import PrometheusMetrics
from tunnel.openssl import libssl, ssl_ctx_pointer
from tunnel.state import TunnelState
from tunnel.tunnel import Tunnel


@asynccontextmanager
async def pair(
    p: PKI,
    tmp: Path,
    handler: Handler,
    *,
    client_listen: str = "127.0.0.1:0",
    server_listen: str = "127.0.0.1:0",
) -> AsyncIterator[tuple[str, Backend]]:
    """Target ← server tunnel ← client tunnel; yields the client tunnel's address."""
    async with backend(handler) as target:
        server = write_yaml(tmp / "server.yaml", server_doc(p, target.address, listen=server_listen))
        async with running_tunnel(server) as (_, server_address):
            client = write_yaml(tmp / "client.yaml", client_doc(p, server_address, listen=client_listen))
            async with running_tunnel(client) as (_, client_address):
                yield client_address, target


async def test_pair_large_random_transfer_arrives_intact(pki_files: PKI, tmp_path: Path) -> None:
    payload = os.urandom(24 * 1024 * 1024)
    async with pair(pki_files, tmp_path, hash_then_reply) as (address, _):
        async with await tcp_connect(address) as stream:
            with trio.fail_after(60):
                await stream.send_all(payload)
                await stream.send_eof()
                reply = await recv_all(stream)
    assert reply.decode() == hashlib.sha256(payload).hexdigest()


async def test_pair_half_close_from_client_keeps_the_return_direction(pki_files: PKI, tmp_path: Path) -> None:
    """The client ends its sending; the target sees EOF, and its answer still comes back."""
    async with pair(pki_files, tmp_path, hash_then_reply) as (address, _):
        async with await tcp_connect(address) as stream:
            with trio.fail_after(10):
                await stream.send_all(b"question")
                await stream.send_eof()
                reply = await recv_all(stream)
    assert reply.decode() == hashlib.sha256(b"question").hexdigest()


async def test_pair_half_close_from_target_keeps_the_client_direction(pki_files: PKI, tmp_path: Path) -> None:
    """The target ends its sending first; the client sees EOF and can still send."""
    got = trio.Event()
    received: list[bytes] = []

    async def close_first_then_listen(stream: trio.SocketStream, state: Backend) -> None:
        await stream.send_all(b"bye")
        await stream.send_eof()
        received.append(await recv_all(stream))
        got.set()

    async with pair(pki_files, tmp_path, close_first_then_listen) as (address, _):
        async with await tcp_connect(address) as stream:
            with trio.fail_after(10):
                assert await recv_all(stream) == b"bye"
                await stream.send_all(b"still talking")
                await stream.send_eof()
                await got.wait()
    assert received == [b"still talking"]


async def test_pair_full_duplex(pki_files: PKI, tmp_path: Path) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    async with pair(pki_files, tmp_path, echo) as (address, _), await tcp_connect(address) as stream:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(payload)
                    await stream.send_eof()

                nursery.start_soon(send)
                echoed = await recv_all(stream)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def test_pair_tiny_writes(pki_files: PKI, tmp_path: Path) -> None:
    async with pair(pki_files, tmp_path, echo) as (address, _), await tcp_connect(address) as stream:
        with trio.fail_after(20):
            for i in range(300):
                byte = bytes([i % 256])
                await stream.send_all(byte)
                assert await stream.receive_some(1) == byte
            await stream.send_eof()
            assert await recv_all(stream) == b""


async def test_pair_target_that_speaks_first(pki_files: PKI, tmp_path: Path) -> None:
    """MySQL and MariaDB greet first: nobody may wait for the client's first byte."""
    async with pair(pki_files, tmp_path, speak_first) as (address, _):
        async with await tcp_connect(address) as stream:
            with trio.fail_after(5):
                assert await stream.receive_some() == b"hello from the target\n"


async def test_pair_over_unix_sockets(pki_files: PKI, tmp_path: Path) -> None:
    client_sock = tmp_path / "client.sock"
    server_sock = tmp_path / "server.sock"
    async with pair(
        pki_files,
        tmp_path,
        hash_then_reply,
        client_listen=f"unix:{client_sock}",
        server_listen=f"unix:{server_sock}",
    ) as (address, _):
        assert address.startswith("unix:")
        async with await trio.open_unix_socket(str(client_sock)) as stream:
            with trio.fail_after(10):
                await stream.send_all(b"x" * 100_000)
                await stream.send_eof()
                reply = await recv_all(stream)
    assert reply.decode() == hashlib.sha256(b"x" * 100_000).hexdigest()
    assert not client_sock.exists(), "the socket file is removed when the tunnel stops"


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
async def test_pair_over_ipv6_loopback(pki_files: PKI, tmp_path: Path) -> None:
    async with pair(pki_files, tmp_path, echo, client_listen="[::1]:0", server_listen="[::1]:0") as (
        address,
        _,
    ):
        assert address.startswith("[::1]:")
        async with await trio.open_tcp_stream("::1", int(address.rpartition(":")[2])) as stream:
            with trio.fail_after(5):
                await stream.send_all(b"six")
                assert await stream.receive_some() == b"six"


async def test_client_tunnel_refuses_a_server_from_another_ca(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address)
        doc["tls"]["cert"] = str(pki_files.other / "other-server.crt")
        doc["tls"]["key"] = str(pki_files.other / "other-server.key")
        doc["tls"]["ca"] = str(pki_files.other / "ca.crt")
        server = write_yaml(tmp_path / "server.yaml", doc)
        async with running_tunnel(server) as (_, server_address):
            client = write_yaml(tmp_path / "client.yaml", client_doc(pki_files, server_address))
            async with running_tunnel(client) as (_, client_address):
                async with await tcp_connect(client_address) as stream:
                    with trio.fail_after(5):
                        assert await read_until_closed(stream) == b""
        assert target.accepted == 0


async def test_client_tunnel_checks_the_server_name(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        server = write_yaml(tmp_path / "server.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(server) as (_, server_address):
            doc = client_doc(pki_files, server_address)
            doc["tls"]["server_name"] = "not-the-server.example"
            client = write_yaml(tmp_path / "client.yaml", doc)
            async with running_tunnel(client) as (_, client_address):
                async with await tcp_connect(client_address) as stream:
                    with trio.fail_after(5):
                        assert await read_until_closed(stream) == b""
        assert target.accepted == 0


async def test_client_tunnel_resumes_tls_sessions(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The second connection through a client tunnel resumes the first one's TLS session."""
    caplog.set_level(logging.INFO, logger="tunnel")
    async with pair(pki_files, tmp_path, echo) as (address, _):
        for _ in range(3):
            async with await tcp_connect(address) as stream:
                with trio.fail_after(5):
                    await stream.send_all(b"hi")
                    assert await stream.receive_some() == b"hi"
                    await stream.send_eof()
                    assert await recv_all(stream) == b""
            with trio.fail_after(5):
                while sum("closed tunnel=client" in r.getMessage() for r in caplog.records) < _ + 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
    opened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("opened tunnel=server")]
    assert len(opened) == 3
    assert "resumed" not in opened[0]
    assert all("tls=TLSv1.3 resumed" in line for line in opened[1:]), opened


@asynccontextmanager
async def client_tunnel(doc: dict[str, Any], tmp: Path) -> AsyncIterator[tuple[str, PrometheusMetrics]]:
    """A client tunnel from `doc`, counting into real metrics; yields its address and them."""
    tunnels: list[Tunnel] = []
    metrics = PrometheusMetrics(lambda: tunnels)
    tunnel = Tunnel(TunnelState.build(load_file(write_yaml(tmp / "client.yaml", doc))), metrics)
    tunnels.append(tunnel)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(tunnel.serve)
        yield hostport(address), metrics
        tunnel.abort()


@asynccontextmanager
async def tls_server(
    p: PKI, *, version: ssl.TLSVersion, tickets: bool = True, session_id_context: bool = True
) -> AsyncIterator[tuple[str, Backend]]:
    """A stdlib TLS server (up to `version`, in a thread, with blocking sockets: OpenSSL
    writes its alerts straight to the socket) requiring a certificate from p's CA; echoes.
    Without `session_id_context` it is redis-server with `tls-session-caching no`: it sends
    session tickets, and fails every handshake that offers one (OpenSSL: "session id
    context uninitialized", an internal error alert), SSL_CTX_set_session_id_context(3)."""
    context = p.server_context()
    context.maximum_version = version
    if not tickets:
        context.num_tickets = 0
    if not session_id_context:
        lib, handle = libssl(), ssl_ctx_pointer(context)
        assert lib is not None
        assert handle is not None
        assert lib.SSL_CTX_set_session_id_context(ctypes.c_void_p(handle), b"", 0) == 1
    state = Backend()
    listener = socket.create_server(("127.0.0.1", 0))
    state.port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # the listener was closed: the test is over
            with sock:
                try:
                    with context.wrap_socket(sock, server_side=True) as tls:
                        state.accepted += 1
                        while data := tls.recv(65536):
                            tls.sendall(data)
                except (ssl.SSLError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield state.address, state
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def stranger_client_doc(p: PKI, server: str, tmp: Path) -> dict[str, Any]:
    """A client tunnel presenting other-app1, whose CA the server does not trust (the
    tunnel trusts both CAs: its own certificate must chain to its tls.ca)."""
    bundle = tmp / "both-cas.crt"
    bundle.write_bytes(p.ca.read_bytes() + (p.other / "ca.crt").read_bytes())
    doc = client_doc(p, server)
    doc["tls"].update(cert=str(p.other / "other-app1.crt"), key=str(p.other / "other-app1.key"), ca=str(bundle))
    return doc


def counted(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"tunnel": "client", **labels}) or 0.0


async def assert_refused_by_server(
    address: str, metrics: PrometheusMetrics, caplog: pytest.LogCaptureFixture, alert: str
) -> None:
    async with await tcp_connect(address) as app:
        with trio.fail_after(5):
            assert await read_until_closed(app) == b""  # the application's connection is closed
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"refused: refused by server: {alert} tunnel=client") for m in messages), messages
    assert not any(m.startswith("opened tunnel=client") for m in messages), messages
    assert counted(metrics, "tunnel_connections_refused_total", reason="refused by server") == 1
    assert counted(metrics, "tunnel_connections_opened_total") == 0


async def test_a_client_tunnel_refused_by_a_server_tunnel_under_tls_1_3_logs_and_counts_a_refusal(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In TLS 1.3 the client's handshake ends before the server checks its certificate:
    the server's alert comes after. It used to be logged as opened, then closed."""
    caplog.set_level(logging.INFO, logger="tunnel")
    async with backend(echo) as target:
        server = write_yaml(tmp_path / "server.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(server) as (_, server_address):
            async with client_tunnel(stranger_client_doc(pki_files, server_address, tmp_path), tmp_path) as (
                address,
                metrics,
            ):
                await assert_refused_by_server(address, metrics, caplog, "unknown ca")
    assert target.accepted == 0


@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_a_client_tunnel_refused_by_a_server_tunnels_allow_rules_is_refused_not_opened(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: str
) -> None:
    """A certificate the server tunnel's CA signed but its allow rules refuse: the server
    decides after the handshake, and used to have sent its TLS 1.3 session ticket (a
    client's sign of acceptance) or TLS 1.2 Finished already, so the client tunnel logged
    opened, then closed. The server now holds them back until it has decided."""
    caplog.set_level(logging.INFO, logger="tunnel")
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address)
        doc["tls"]["min_version"] = version
        async with running_tunnel(write_yaml(tmp_path / "server.yaml", doc)) as (_, server_address):
            client = client_doc(pki_files, server_address, name="stranger")
            async with client_tunnel(client, tmp_path) as (address, metrics):
                async with await tcp_connect(address) as app:
                    with trio.fail_after(5):
                        assert await read_until_closed(app) == b""
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("refused: not allowed") and "tunnel=server" in m for m in messages), messages
    assert any(m.startswith("refused:") and "tunnel=client" in m for m in messages), messages
    assert not any(m.startswith("opened tunnel=client") for m in messages), messages
    assert counted(metrics, "tunnel_connections_opened_total") == 0
    assert target.accepted == 0


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_a_client_tunnel_refused_by_a_tls_server_logs_the_servers_alert(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: ssl.TLSVersion
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    async with tls_server(pki_files, version=version) as (server, state):
        async with client_tunnel(stranger_client_doc(pki_files, server, tmp_path), tmp_path) as (address, metrics):
            await assert_refused_by_server(address, metrics, caplog, "unknown ca")
    assert state.accepted == 0


@pytest.mark.parametrize("tickets", [True, False], ids=["tickets", "no-tickets"])
async def test_a_client_tunnel_accepted_under_tls_1_3_is_opened_and_relays(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, tickets: bool
) -> None:
    """The wait for the server's verdict ends on its session ticket, or, from a server
    that sends none (and waits for the client to speak), after a short while."""
    caplog.set_level(logging.INFO, logger="tunnel")
    async with tls_server(pki_files, version=ssl.TLSVersion.TLSv1_3, tickets=tickets) as (server, _):
        async with client_tunnel(client_doc(pki_files, server), tmp_path) as (address, metrics):
            async with await tcp_connect(address) as app:
                with trio.fail_after(5):
                    await app.send_all(b"ping")
                    assert await app.receive_some() == b"ping"
            assert counted(metrics, "tunnel_connections_opened_total") == 1
            assert counted(metrics, "tunnel_connections_refused_total", reason="refused by server") == 0
    assert any(r.getMessage().startswith("opened tunnel=client") for r in caplog.records)


async def test_a_client_tunnel_stops_resuming_with_a_server_that_fails_resumed_handshakes(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that sends tickets but fails every handshake offering one (redis-server
    with `tls-session-caching no`): every connection after the first used to be refused
    (`refused by server: internal error`). Now the refused resumption is retried at once
    with a full handshake, said once as a warning, and no session is offered again."""
    caplog.set_level(logging.INFO, logger="tunnel")
    async with tls_server(pki_files, version=ssl.TLSVersion.TLSv1_3, session_id_context=False) as (server, state):
        async with client_tunnel(client_doc(pki_files, server), tmp_path) as (address, metrics):
            for _ in range(4):
                async with await tcp_connect(address) as app:
                    with trio.fail_after(5):
                        await app.send_all(b"ping")
                        assert await app.receive_some() == b"ping"
                        await app.send_eof()
                        assert await recv_all(app) == b""
                with trio.fail_after(5):
                    while counted(metrics, "tunnel_connections_closed_total", reason="done") < _ + 1:  # noqa: ASYNC110
                        await trio.sleep(0.01)
            assert counted(metrics, "tunnel_connections_opened_total") == 4
            assert counted(metrics, "tunnel_connections_refused_total", reason="refused by server") == 0
    messages = [r.getMessage() for r in caplog.records]
    warned = [m for m in messages if m.startswith("resumption refused tunnel=client")]
    assert len(warned) == 1, messages
    assert "refused by server: internal error" in warned[0]
    assert state.accepted == 4  # one failed resumption, then four full handshakes
