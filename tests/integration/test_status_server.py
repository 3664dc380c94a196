"""The status address's HTTP server (serve_http, which the daemon and the --workers
supervisor both use) against clients that connect and say nothing, too much, or not HTTP;
and `tunnel status`'s client (fetch) against servers that do not answer HTTP."""

from __future__ import annotations

import contextlib
import socket

import pytest
import trio

from tests.helpers import closed_by_peer, free_port, read_until_closed
from tunnel import status
from tunnel.config import Address


async def answer(path: str) -> tuple[str, str, bytes]:
    await trio.lowlevel.checkpoint()
    return "200 OK", "text/plain", path.encode()


async def get(port: int, path: str = "/healthz") -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return await read_until_closed(stream)


async def test_past_the_cap_a_new_connection_closes_the_oldest_idle_one_and_is_answered() -> None:
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(status.serve_http, Address(host="127.0.0.1", port=0), answer))[1]
        with contextlib.ExitStack() as sockets:
            # Plain sockets: the kernel completes each connect; the server accepts them in turn.
            idle = [sockets.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(32)]
            await trio.sleep(0.1)
            assert [closed_by_peer(s) for s in idle] == [False] * 32
            with trio.fail_after(1):
                assert (await get(port, "/x")).endswith(b"\r\n\r\n/x")
            assert [closed_by_peer(s) for s in idle] == [True] + [False] * 31, "the oldest gave way"
            for _ in range(10):
                sockets.enter_context(socket.create_connection(("127.0.0.1", port)))
            await trio.sleep(0.1)
            # one takes the place the answered GET left, nine more close the next oldest
            assert [closed_by_peer(s) for s in idle] == [True] * 10 + [False] * 22
        nursery.cancel_scope.cancel()


async def test_a_client_that_sends_no_complete_request_is_closed_after_two_seconds() -> None:
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(status.serve_http, Address(host="127.0.0.1", port=0), answer))[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        await stream.send_all(b"GET /healthz HTTP/1.1\r\n")  # and never the blank line
        with trio.fail_after(3):
            assert await read_until_closed(stream) == b""
        assert trio.current_time() - started > 1.9
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_when_every_connection_is_being_answered_a_new_one_is_closed_at_once() -> None:
    release = trio.Event()

    async def slow(path: str) -> tuple[str, str, bytes]:
        await release.wait()
        return "200 OK", "text/plain", b"late"

    async with trio.open_nursery() as nursery:
        address = Address(host="127.0.0.1", port=0)
        port = (await nursery.start(lambda task_status: status.serve_http(address, slow, max_connections=2,
                                                                           task_status=task_status)))[1]  # fmt: skip
        answering = []
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answering.append(stream)
        await trio.sleep(0.1)
        with trio.fail_after(1):
            assert await get(port) == b"", "closed at once: nobody to give way"
        release.set()
        for stream in answering:
            with trio.fail_after(1):
                assert (await read_until_closed(stream)).endswith(b"late")
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def reply_to(request: bytes) -> bytes:
    """Everything serve_http (answering with `answer`) sends back to `request`, sent raw."""
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(status.serve_http, Address(host="127.0.0.1", port=0), answer))[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            with trio.fail_after(1):
                reply = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    return reply


@pytest.mark.parametrize(
    "request_bytes",
    [b"GARBAGE\r\n\r\n", b"GET /healthz HTTP/1.1\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: a\r\nX Y: z\r\n\r\n"],
    ids=["no-request-line", "http/1.1-without-host", "space-in-header-name"],
)
async def test_a_malformed_request_is_answered_400_and_closed(request_bytes: bytes) -> None:
    reply = await reply_to(request_bytes)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\r\nConnection: close\r\n" in reply


async def test_a_post_is_answered_405_with_an_allow_header_naming_get() -> None:
    reply = await reply_to(b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET\r\n" in reply
    assert reply.endswith(b"\r\n\r\nonly GET\n")


async def test_an_http_1_0_request_without_host_is_answered() -> None:
    reply = await reply_to(b"GET /x?y HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\n/x")


async def fake_server(reply: bytes, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer every connection with `reply` (or nothing, if empty, but hold it open)."""

    async def each(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some()
            if not reply:
                await trio.sleep_forever()
            await stream.send_all(reply)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(each, listeners)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP answer: "),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "not an HTTP answer: peer closed connection without"),
        (b"", "timed out"),
    ],
    ids=["not-http", "cut-short", "silent"],
)
async def test_tunnel_status_says_there_is_no_answer_from_a_server_that_does_not_answer_http(
    reply: bytes, reason: str
) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(fake_server, reply)
        address = Address(host="127.0.0.1", port=port)
        with pytest.raises(status.StatusUnavailable) as failed:
            await trio.to_thread.run_sync(lambda: status.fetch(address, "/healthz", timeout=0.5))
        assert str(failed.value).startswith(f"no answer from 127.0.0.1:{port}: {reason}")
        nursery.cancel_scope.cancel()


async def test_tunnel_status_names_the_refusal_of_a_port_nobody_listens_on() -> None:
    port = free_port()
    with pytest.raises(status.StatusUnavailable) as failed:
        await trio.to_thread.run_sync(lambda: status.fetch(Address(host="127.0.0.1", port=port), "/healthz"))
    assert str(failed.value) == f"no answer from 127.0.0.1:{port}: [Errno 111] Connection refused"
