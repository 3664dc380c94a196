"""TLSStream against trio.SSLStream over a socketpair: half-close, overflow, EOF kinds."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tests.helpers import PKI
from tunnel.streams import PlainStream, TLSStream


@asynccontextmanager
async def connected(p: PKI) -> AsyncIterator[tuple[TLSStream, trio.SSLStream[trio.SocketStream]]]:
    """Our TLSStream (server side) and a trio.SSLStream client, handshaken."""
    ours_sock, peer_sock = socket.socketpair()
    ours = TLSStream(ours_sock, p.server_context(), server_side=True)
    peer = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(peer_sock)),
        p.client_context("app1"),
        server_hostname="localhost",
    )
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours.do_handshake)
                nursery.start_soon(peer.do_handshake)
        yield ours, peer
    finally:
        ours.close()
        await trio.aclose_forcefully(peer)


async def test_send_eof_keeps_receiving_and_loses_no_buffered_record(pki_files: PKI) -> None:
    """send_eof while complete records wait in the incoming buffer: none may be lost."""
    payload = os.urandom(2 * 1024 * 1024)
    async with connected(pki_files) as (ours, peer):
        received = bytearray()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def peer_side() -> None:
                    await peer.send_all(payload)
                    assert await peer.receive_some() == b"", "close_notify arrives as EOF"
                    await peer.aclose()  # sends its own close_notify

                nursery.start_soon(peer_side)
                received += await ours.receive_some(1000)  # leaves records undecrypted
                await ours.send_eof()
                while data := await ours.receive_some():
                    received += data
    assert bytes(received) == payload
    assert not ours.unclean_eof


async def test_data_sent_before_send_eof_arrives_before_eof(pki_files: PKI) -> None:
    async with connected(pki_files) as (ours, peer):
        with trio.fail_after(5):
            await ours.send_all(b"last words")
            await ours.send_eof()
            got = b""
            while data := await peer.receive_some():
                got += data
    assert got == b"last words"


async def test_tcp_close_without_close_notify_is_an_unclean_eof(pki_files: PKI) -> None:
    async with connected(pki_files) as (ours, peer):
        await peer.send_all(b"abrupt")
        await peer.transport_stream.send_eof()  # a TCP FIN with no close_notify before it
        with trio.fail_after(5):
            got = b""
            while data := await ours.receive_some():
                got += data
    assert got == b"abrupt"
    assert ours.unclean_eof


async def test_send_all_after_send_eof_is_refused(pki_files: PKI) -> None:
    async with connected(pki_files) as (ours, _):
        await ours.send_eof()
        try:
            await ours.send_all(b"x")
        except trio.ClosedResourceError:
            pass
        else:
            raise AssertionError("send_all after send_eof must fail")


async def test_send_eof_after_an_unclean_eof_ends_with_a_tcp_fin(pki_files: PKI) -> None:
    """The peer left without close_notify; answering data and our own EOF still get through."""
    async with connected(pki_files) as (ours, peer):
        await peer.send_all(b"bye")
        await peer.transport_stream.send_eof()  # FIN, no close_notify
        with trio.fail_after(5):
            assert await ours.receive_some() == b"bye"
            assert await ours.receive_some() == b""
            assert ours.unclean_eof
            await ours.send_eof()
            raw = peer.transport_stream
            while await raw.receive_some():  # session tickets it never read, then...
                pass  # ...a plain FIN: the loop ends instead of timing out


async def test_send_eof_keeps_bytes_openssl_holds_from_a_record_read_part_way(pki_files: PKI) -> None:
    """A receive that stops inside a record leaves the rest in OpenSSL, not in the BIO."""
    async with connected(pki_files) as (ours, peer):
        with trio.fail_after(5):
            await peer.send_all(b"r" * 5000)  # one TLS record
            first = await ours.receive_some(1000)
            assert ours.ssl.pending() > 0
            await ours.send_eof()  # must neither fail nor lose the 4000 bytes held
            rest = b""
            while len(first) + len(rest) < 5000:
                rest += await ours.receive_some()
    assert first + rest == b"r" * 5000


async def test_a_scratch_view_left_unsent_survives_the_scratch_being_reused() -> None:
    """receive_view hands out the shared scratch buffer; a send that has to wait must have
    copied what it still owes, because another receive reuses the buffer meanwhile."""
    stalled_ours, stalled_peer = socket.socketpair()
    feed_ours, feed_peer = socket.socketpair()
    stalled = PlainStream(stalled_ours)
    feed = PlainStream(feed_ours)
    feed_peer.setblocking(False)
    stalled_peer.setblocking(False)
    first, second = b"A" * (4 * 1024 * 1024), b"B" * (64 * 1024)
    received = bytearray()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def forward_first() -> None:
                    view = memoryview(bytearray(first))  # stands in for a scratch view
                    sending = stalled.send_all(view)
                    nursery.start_soon(reuse_and_drain, view)
                    await sending  # blocks: the peer is not reading yet

                async def reuse_and_drain(view: memoryview) -> None:
                    await trio.sleep(0.05)
                    view[:] = b"Z" * len(view)  # the buffer is reused while the send waits
                    feed_peer.send(second)
                    assert bytes(await feed.receive_view()) == second
                    while len(received) < len(first):
                        try:
                            received.extend(stalled_peer.recv(1 << 20))
                        except BlockingIOError:
                            await trio.lowlevel.wait_readable(stalled_peer)

                nursery.start_soon(forward_first)
        assert received == first
    finally:
        for sock in (stalled_peer, feed_peer):
            sock.close()
        stalled.close()
        feed.close()


async def test_a_scratch_view_kept_across_a_yield_fails_loudly() -> None:
    """receive_view lends the process-wide scratch buffer until the caller next yields;
    a caller that keeps it while another receive refills the buffer would relay the
    other connection's bytes. With TUNNEL_CHECK_SCRATCH=1 (the suite's) it raises."""
    from tunnel import streams

    assert streams._CHECK_SCRATCH
    a_in, a_out = socket.socketpair()
    b_in, b_out = socket.socketpair()
    sink_in, sink_out = socket.socketpair()
    with a_in, a_out, b_in, b_out, sink_in, sink_out:
        a, b, sink = PlainStream(a_out), PlainStream(b_out), PlainStream(sink_in)
        a_in.sendall(b"from a")
        b_in.sendall(b"from b")
        kept = await a.receive_view()
        fresh = await b.receive_view()  # refills the scratch buffer under `kept`
        assert bytes(kept) == b"from b"  # the reason for the rule
        await sink.send_all(fresh)  # the view handed out last: fine
        with pytest.raises(streams.ScratchMisuse):
            await sink.send_all(kept)
        await sink.send_all(bytes(kept))  # a copy is the caller's own
