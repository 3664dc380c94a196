"""Several server tunnels on one listen address, chosen by the client's SNI: each with
its own certificate, rules and target; an unknown name refused with a TLS alert; a `*`
fallback; PostgreSQL's SSLRequest before the ClientHello."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509

from tests.helpers import PKI, Backend, backend, echo, free_port, read_until_closed, server_doc, tcp_connect, write_yaml
from tunnel import pki, postgres
from tunnel.config import load_file
from tunnel.listener import Listeners
from tunnel.state import TunnelState
from tunnel.tunnel import Tunnel

NAMES = ("redis.internal", "pg.internal", "echo.internal")


def _certificate_for(p: PKI, names: list[str]) -> tuple[str, str]:
    stem = names[0].replace(".", "-")
    if not p.crt(stem).exists():
        pki.issue(p.dir, stem, kind="server", dns=names)
    return str(p.crt(stem)), str(p.key(stem))


def _doc(p: PKI, listen: str, target: str, sni: list[str], **extra: Any) -> dict[str, Any]:
    doc = server_doc(p, target, listen=listen, sni=sni, **extra)
    named = [n for n in sni if n != "*"]
    if named:
        cert, key = _certificate_for(p, named)
        doc["tls"].update(cert=cert, key=key)
    return doc


@asynccontextmanager
async def shared(tmp: Path, docs: dict[str, dict[str, Any]]) -> AsyncIterator[tuple[dict[str, Tunnel], Listeners]]:
    """Tunnels sharing one Listeners registry, as the daemon runs them."""
    listeners = Listeners()
    tunnels = {
        name: Tunnel(TunnelState.build(load_file(write_yaml(tmp / f"{name}.yaml", doc))), listeners=listeners)
        for name, doc in docs.items()
    }
    async with trio.open_nursery() as nursery:
        for tunnel in tunnels.values():
            await nursery.start(tunnel.serve)
        yield tunnels, listeners
        for tunnel in tunnels.values():
            tunnel.abort()


def _context(p: PKI, *, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = p.client_context("app1")
    ctx.check_hostname = True
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


async def _connect(
    p: PKI, address: str, name: str | None, *, check: bool = True, source: str | None = None, **kw: Any
) -> trio.SSLStream[trio.SocketStream]:
    ctx = _context(p, **kw)
    if name is None or not check:
        ctx.check_hostname = False
    tcp = await tcp_connect(address, source=source)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        await tls.do_handshake()
    except BaseException:
        await tcp.aclose()
        raise
    return tls


def _served_name(tls: trio.SSLStream[trio.SocketStream]) -> str:
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return str(san.value.get_values_for_type(x509.DNSName)[0])


async def _echo_through(tls: trio.SSLStream[trio.SocketStream], data: bytes) -> bytes:
    await tls.send_all(data)
    got = b""
    while len(got) < len(data):
        got += await tls.receive_some()
    return got


@asynccontextmanager
async def three(p: PKI, tmp: Path) -> AsyncIterator[tuple[str, list[Backend], dict[str, Tunnel]]]:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    async with backend(echo) as a, backend(echo) as b, backend(echo) as c:
        docs = {
            "redis": _doc(p, listen, a.address, ["redis.internal"]),
            "pg": _doc(p, listen, b.address, ["pg.internal"], protocol="postgres"),
            "echo": _doc(p, listen, c.address, ["echo.internal", "*.echo.internal"]),
        }
        async with shared(tmp, docs) as (tunnels, _):
            yield listen, [a, b, c], tunnels


async def test_three_tunnels_on_one_port_are_reached_by_name_each_with_its_own_certificate_and_target(
    pki_files: PKI, tmp_path: Path
) -> None:
    async with three(pki_files, tmp_path) as (listen, targets, _):
        for name, target in zip(NAMES, targets, strict=True):
            alpn = ["postgresql"] if name.startswith("pg") else None
            tls = await _connect(pki_files, listen, name, alpn=alpn)
            assert _served_name(tls) == name
            assert await _echo_through(tls, name.encode()) == name.encode()
            await tls.aclose()
            assert target.accepted == 1
        tls = await _connect(pki_files, listen, "a.echo.internal", alpn=None)
        assert await _echo_through(tls, b"wild") == b"wild"
        await tls.aclose()
        assert targets[2].accepted == 2


async def test_a_postgres_client_asks_for_tls_first_on_a_shared_port(pki_files: PKI, tmp_path: Path) -> None:
    async with three(pki_files, tmp_path) as (listen, targets, _):
        tcp = await tcp_connect(listen)
        await tcp.send_all(postgres.SSL_REQUEST)
        assert await tcp.receive_some(1) == b"S"
        tls = trio.SSLStream(tcp, _context(pki_files, alpn=["postgresql"]), server_hostname="pg.internal")
        await tls.do_handshake()
        assert await _echo_through(tls, b"select 1") == b"select 1"
        await tls.aclose()
        assert [t.accepted for t in targets] == [0, 1, 0]


@pytest.mark.parametrize("name", ["unknown.internal", None])
async def test_an_unknown_or_missing_server_name_gets_an_unrecognized_name_alert(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str | None
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    async with three(pki_files, tmp_path) as (listen, targets, _):
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError)) as raised:
            await _connect(pki_files, listen, name)
        cause = raised.value if isinstance(raised.value, ssl.SSLError) else raised.value.__cause__
        assert "UNRECOGNIZED_NAME" in str(cause).upper()
        assert [t.accepted for t in targets] == [0, 0, 0]
    assert any("refused: unknown server name" in r.getMessage() for r in caplog.records)


async def test_a_star_tunnel_takes_the_names_nobody_claims(pki_files: PKI, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    async with backend(echo) as named, backend(echo) as fallback:
        docs = {
            "named": _doc(pki_files, listen, named.address, ["redis.internal"]),
            "rest": _doc(pki_files, listen, fallback.address, ["*"]),
        }
        async with shared(tmp_path, docs):
            for name in ("other.internal", None, "redis.internal"):
                tls = await _connect(pki_files, listen, name, check=False)
                assert await _echo_through(tls, b"x") == b"x"
                await tls.aclose()
        assert (named.accepted, fallback.accepted) == (1, 2)


async def test_a_tunnel_whose_rules_refuse_the_client_refuses_it_while_its_neighbour_would_not(
    pki_files: PKI, tmp_path: Path
) -> None:
    """The name picks the tunnel, so its allow rules decide, not the first tunnel's."""
    listen = f"127.0.0.1:{free_port()}"
    async with backend(echo) as open_target, backend(echo) as strict_target:
        docs = {
            "open": _doc(pki_files, listen, open_target.address, ["open.internal"]),
            "strict": _doc(pki_files, listen, strict_target.address, ["strict.internal"], allow={"cn": ["app2"]}),
        }
        async with shared(tmp_path, docs):
            tls = await _connect(pki_files, listen, "strict.internal")
            assert await read_until_closed(tls) == b""
            await tls.transport_stream.aclose()
            tls = await _connect(pki_files, listen, "open.internal")
            assert await _echo_through(tls, b"ok") == b"ok"
            await tls.aclose()
        assert (open_target.accepted, strict_target.accepted) == (1, 0)


async def test_removing_one_tunnel_keeps_the_address_and_the_others_open_connections(
    pki_files: PKI, tmp_path: Path
) -> None:
    async with three(pki_files, tmp_path) as (listen, _targets, tunnels):
        kept = await _connect(pki_files, listen, "echo.internal")
        gone = await _connect(pki_files, listen, "redis.internal")
        tunnels["redis"].stop(drain=True)  # as a reload that removes its file does
        await trio.sleep(0.1)
        assert await _echo_through(kept, b"still") == b"still"
        assert await _echo_through(gone, b"draining") == b"draining"  # drained, not cut
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
            await _connect(pki_files, listen, "redis.internal")
        fresh = await _connect(pki_files, listen, "pg.internal", alpn=["postgresql"])
        assert await _echo_through(fresh, b"new") == b"new"
        for tls in (kept, gone, fresh):
            await tls.aclose()


async def test_a_socket_waiting_for_room_in_a_tunnel_that_stops_meanwhile_is_refused_not_served(
    pki_files: PKI, tmp_path: Path
) -> None:
    """A connection routed by name to a tunnel at its max_connections waits for room; if
    that tunnel stops meanwhile (a reload removed it), the slot that then frees is given
    back and the connection is refused ("no room"), instead of being served from the
    stopped tunnel's draining connections."""
    listen = f"127.0.0.1:{free_port()}"
    async with backend(echo) as a, backend(echo) as b:
        docs = {
            "redis": _doc(pki_files, listen, a.address, ["redis.internal"], limits={"max_connections": 1}),
            "echo": _doc(pki_files, listen, b.address, ["echo.internal"]),
        }
        async with shared(tmp_path, docs) as (tunnels, _):
            first = await _connect(pki_files, listen, "redis.internal")
            assert await _echo_through(first, b"one") == b"one"
            outcome: list[BaseException | None] = []

            async def second() -> None:
                try:
                    # Another source: the per-source cap (1, as max_connections) is not the limit.
                    tls = await _connect(pki_files, listen, "redis.internal", source="127.0.0.2")
                    try:
                        await _echo_through(tls, b"two")
                        outcome.append(None)
                    finally:
                        await tls.aclose()
                except (trio.BrokenResourceError, ssl.SSLError) as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
                await trio.sleep(0.5)  # routed, and waiting for redis's only slot
                assert outcome == []
                tunnels["redis"].stop(drain=True)  # as a reload that removes its file does
                await first.aclose()  # the slot frees: the waiting socket must not take it
            assert len(outcome) == 1
            assert outcome[0] is not None, "served by a stopped tunnel"
            assert tunnels["redis"].gate.connections == 0
            still = await _connect(pki_files, listen, "echo.internal")
            assert await _echo_through(still, b"three") == b"three"
            await still.aclose()
