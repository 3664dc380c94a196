"""How the daemon ends a connection it decides to end: an idle timeout or the SIGTERM
drain deadline end both sides as a normal end of stream (a TCP FIN; a TLS close_notify
first on the TLS side), while a refusal on reload ends them with a reset."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from tests.helpers import (
    PKI,
    client_doc,
    hostport,
    running_tunnel,
    server_doc,
    tcp_connect,
    tls_connect,
    write_yaml,
)
from tunnel.config import load_file
from tunnel.state import TunnelState


async def how_it_ends(stream: trio.abc.ReceiveStream) -> str:
    """Read until the end: "eof" for a normal end (a FIN on TCP; a close_notify on a
    trio.SSLStream, which counts a TCP close without one as broken), else "broken: ..."."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError as exc:
        return f"broken: {exc.__cause__ or exc}"
    return "eof"


@dataclass
class Peer:
    """The far side of a tunnel: how its connection ended, once it has."""

    ended: list[str] = field(default_factory=list)
    connected: trio.Event = field(default_factory=trio.Event)

    async def wait_ended(self) -> str:
        with trio.fail_after(5):
            while not self.ended:  # noqa: ASYNC110
                await trio.sleep(0.01)
        return self.ended[0]


@asynccontextmanager
async def far_side(p: PKI | None = None) -> AsyncIterator[tuple[str, Peer]]:
    """A TCP server on 127.0.0.1 (a TLS server requiring a client certificate when given
    a PKI) that reads each connection to its end and records how it ended."""
    peer = Peer()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def serve(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if p is not None:
            stream = trio.SSLStream(tcp, p.server_context(), server_side=True)
            await stream.do_handshake()
        peer.connected.set()
        peer.ended.append(await how_it_ends(stream))
        await tcp.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        yield hostport(listeners[0].socket.getsockname()), peer
        nursery.cancel_scope.cancel()


async def test_an_idle_timeout_ends_a_server_tunnel_with_close_notify_and_a_fin(pki_files: PKI, tmp_path: Path) -> None:
    async with far_side() as (target, peer):
        doc = server_doc(pki_files, target, limits={"idle_timeout": "1s"})
        async with running_tunnel(write_yaml(tmp_path / "s.yaml", doc)) as (_, address):
            async with await tls_connect(pki_files, address, "app1") as client:
                with trio.fail_after(5):
                    assert await how_it_ends(client) == "eof"  # a close_notify, not a bare FIN or a reset
                assert await peer.wait_ended() == "eof"  # a FIN, not a reset


async def test_an_idle_timeout_ends_a_client_tunnel_with_a_fin_and_close_notify(pki_files: PKI, tmp_path: Path) -> None:
    async with far_side(pki_files) as (server, peer):
        doc = client_doc(pki_files, server, limits={"idle_timeout": "1s"})
        async with running_tunnel(write_yaml(tmp_path / "c.yaml", doc)) as (_, address):
            async with await tcp_connect(address) as app:
                with trio.fail_after(5):
                    assert await how_it_ends(app) == "eof"  # a FIN, not a reset
                assert await peer.wait_ended() == "eof"  # a close_notify: trio's TLS server says so


async def test_the_drain_deadline_ends_connections_like_an_idle_timeout(pki_files: PKI, tmp_path: Path) -> None:
    async with far_side() as (target, peer):
        doc = server_doc(pki_files, target, limits={"drain_timeout": "300ms"})
        async with running_tunnel(write_yaml(tmp_path / "s.yaml", doc)) as (tunnel, address):
            async with await tls_connect(pki_files, address, "app1") as client:
                with trio.fail_after(5):
                    await peer.connected.wait()
                    tunnel.stop()  # as on SIGTERM
                    assert await how_it_ends(client) == "eof"
                assert await peer.wait_ended() == "eof"


async def test_a_connection_cut_on_reload_ends_with_a_reset(pki_files: PKI, tmp_path: Path) -> None:
    """A refusal must not look like a normal end, to either side."""
    async with far_side() as (target, peer):
        doc = server_doc(pki_files, target)
        async with running_tunnel(write_yaml(tmp_path / "s.yaml", doc)) as (tunnel, address):
            client = await tls_connect(pki_files, address, "app1")
            try:
                with trio.fail_after(5):
                    await peer.connected.wait()
                    doc["allow"] = {"cn": ["app2"]}
                    tunnel.replace_state(TunnelState.build(load_file(write_yaml(tmp_path / "s.yaml", doc))))
                    tunnel.revalidate()
                    assert (await how_it_ends(client)).startswith("broken:")
                assert (await peer.wait_ended()).startswith("broken:")
            finally:
                await trio.aclose_forcefully(client)
