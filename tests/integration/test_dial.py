"""Dialling targets (tunnel.dial, dial_any) over real sockets."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from tests.helpers import backend, echo
from tunnel.config import Address, parse_address
from tunnel.tunnel import dial, dial_any


def full_unix_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A unix listener whose accept queue is full: the next connect fails with EAGAIN."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            return listener, queued
        queued.append(sock)


async def test_a_unix_target_with_a_full_accept_queue_is_refused_not_returned_unconnected(tmp_path: Path) -> None:
    listener, queued = full_unix_listener(tmp_path / "busy.sock")
    try:
        with trio.fail_after(5), pytest.raises(OSError, match="accept queue is full"):
            await dial(Address(path=str(tmp_path / "busy.sock")))
    finally:
        for sock in (listener, *queued):
            sock.close()


async def test_dial_any_moves_on_from_a_full_unix_target(tmp_path: Path) -> None:
    listener, queued = full_unix_listener(tmp_path / "busy.sock")
    try:
        async with backend(echo) as target:
            targets = (Address(path=str(tmp_path / "busy.sock")), parse_address(target.address))
            with trio.fail_after(5):
                sock, used = await dial_any(targets, 2)
            with sock:
                assert used == targets[1]
                assert sock.getpeername()[1] == used.port
    finally:
        for sock in (listener, *queued):
            sock.close()


async def test_a_target_named_by_a_host_name_is_resolved_and_dialled() -> None:
    family, _, _, _, sockaddr = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind(sockaddr[:2])
        listener.listen()
        port = listener.getsockname()[1]
        with trio.fail_after(5):
            sock = await dial(Address("localhost", port), trio.current_time() + 5)
        with sock:
            assert sock.getpeername()[1] == port


async def test_a_connect_that_does_not_finish_by_the_deadline_times_out() -> None:
    with socket.socket() as blackhole:  # a full backlog: the kernel drops further SYNs
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(blackhole.getsockname())
                fillers.append(filler)
            port = blackhole.getsockname()[1]
            with trio.fail_after(5), pytest.raises(TimeoutError, match="connect timeout"):
                await dial(Address("127.0.0.1", port), trio.current_time() + 0.3)
        finally:
            for filler in fillers:
                filler.close()
