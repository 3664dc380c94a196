"""Dialling targets (tunnel.dial, dial_any) over real sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import backend, echo
from tunnel.config import Address, parse_address
from tunnel.dial import TargetUnavailable, dial, dial_any


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


class FixedNames(trio.abc.HostnameResolver):
    """Answers for the host names given, with the addresses given, in that order: a name
    that resolves to ::1 then 127.0.0.1 whatever /etc/hosts says (trio asks it only for
    names; the connections themselves are real)."""

    def __init__(self, names: dict[str, list[tuple[str, int]]]) -> None:
        self.names = names

    async def getaddrinfo(
        self, host: bytes | None, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        name = (host or b"").decode()
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET6 if ":" in ip else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (ip, port, 0, 0) if ":" in ip else (ip, port),
            )
            for ip, port in self.names[name]
        ]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


def resolve_names(names: dict[str, list[tuple[str, int]]]) -> None:
    """Use FixedNames for the rest of this trio run (each test is a run of its own)."""
    trio.socket.set_custom_hostname_resolver(FixedNames(names))


@contextmanager
def listening(host: str, port: int = 0) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as listener:
        listener.bind((host, port))
        listener.listen()
        yield listener


def unused_port_on_both_loopbacks() -> int:
    """A port free on 127.0.0.1 and on ::1, so one on each is refused."""
    while True:
        with listening("127.0.0.1") as v4:
            port: int = v4.getsockname()[1]
            try:
                with listening("::1", port):
                    return port
            except OSError:
                continue


async def test_a_name_whose_first_address_refuses_is_dialled_on_its_next_address() -> None:
    """db.internal -> ::1, 127.0.0.1, the service on IPv4 only: every connection failed
    when only the first address was tried."""
    with listening("127.0.0.1") as listener:
        port = listener.getsockname()[1]
        resolve_names({"db.internal": [("::1", port), ("127.0.0.1", port)]})
        with trio.fail_after(5):
            sock, used = await dial_any((Address("db.internal", port),), 2)
        with sock:
            assert sock.getpeername()[:2] == ("127.0.0.1", port)
            assert used == Address("db.internal", port)


async def test_when_every_address_of_a_name_fails_the_error_names_each_one() -> None:
    port = unused_port_on_both_loopbacks()
    resolve_names({"db.internal": [("::1", port), ("127.0.0.1", port)]})
    with trio.fail_after(5), pytest.raises(TargetUnavailable) as failed:
        await dial_any((Address("db.internal", port),), 2)
    assert str(failed.value) == (
        f"db.internal:{port}: [::1]:{port}: Connection refused; 127.0.0.1:{port}: Connection refused"
    )


@contextmanager
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept backlog is full: the kernel drops further SYNs, so
    a connect to it neither succeeds nor fails."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(listener.getsockname())
                fillers.append(filler)
            yield listener.getsockname()[1]
        finally:
            for filler in fillers:
                filler.close()


async def test_an_address_that_does_not_answer_does_not_hold_up_the_next_one() -> None:
    """RFC 8305 section 5: the next address is tried 250 ms into a pending attempt, not
    after the whole connect timeout."""
    with blackhole() as silent, listening("::1") as listener:
        port = listener.getsockname()[1]
        resolve_names({"db.internal": [("127.0.0.1", silent), ("::1", port)]})
        started = trio.current_time()
        with trio.fail_after(5):
            sock = await dial(Address("db.internal", port), started + 4)
        with sock:
            assert sock.getpeername()[1] == port
        assert trio.current_time() - started < 2


async def test_all_the_addresses_of_a_name_share_one_deadline() -> None:
    with blackhole() as one, blackhole() as two:
        resolve_names({"db.internal": [("127.0.0.1", one), ("127.0.0.1", two)]})
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(TimeoutError) as failed:
            await dial(Address("db.internal", one), started + 0.6)
        assert trio.current_time() - started < 1.2
    assert failed.value.strerror == f"127.0.0.1:{one}: connect timeout; 127.0.0.1:{two}: connect timeout"
