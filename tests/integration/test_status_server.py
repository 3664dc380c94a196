"""The status address's HTTP server (serve_http, which the daemon and the --workers
supervisor both use) against clients that connect and say nothing, or too much."""

from __future__ import annotations

import contextlib
import socket

import trio

from tests.helpers import read_until_closed
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


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (EOF or reset) by now, without waiting."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def test_past_the_cap_a_new_connection_closes_the_oldest_idle_one_and_is_answered() -> None:
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(status.serve_http, Address(host="127.0.0.1", port=0), answer))[1]
        with contextlib.ExitStack() as sockets:
            # Plain sockets: the kernel completes each connect; the server accepts them in turn.
            idle = [sockets.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(32)]
            await trio.sleep(0.1)
            assert [closed(s) for s in idle] == [False] * 32
            with trio.fail_after(1):
                assert (await get(port, "/x")).endswith(b"\r\n\r\n/x")
            assert [closed(s) for s in idle] == [True] + [False] * 31, "the oldest gave way"
            for _ in range(10):
                sockets.enter_context(socket.create_connection(("127.0.0.1", port)))
            await trio.sleep(0.1)
            # one takes the place the answered GET left, nine more close the next oldest
            assert [closed(s) for s in idle] == [True] * 10 + [False] * 22
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
            await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
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
