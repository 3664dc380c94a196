"""Dialling a target: the first of a `target:` list that answers, each host name's
addresses raced "Happy Eyeballs" style (RFC 8305), all under `connect_timeout`."""

from __future__ import annotations

import errno
import functools
import math
import os
import socket
from collections.abc import Sequence
from typing import Any

import trio

from tunnel.config import Address, format_sockaddr


class TargetUnavailable(Exception):
    """No target in the list accepted a connection in time."""


async def dial_any(targets: tuple[Address, ...], seconds_each: float) -> tuple[socket.socket, Address]:
    """Connect to the first target that answers, in order; TargetUnavailable if none does.
    Each target gets `seconds_each` seconds, for all of its addresses together."""
    problems = []
    for target in targets:
        try:
            return await dial(target, trio.current_time() + seconds_each), target
        except OSError as exc:
            problems.append(f"{target}: {exc.strerror or exc}")
    raise TargetUnavailable("; ".join(problems))


# RFC 8305 section 5: start the next address this long after the previous attempt if it
# has not failed or succeeded by then (its recommended default).
CONNECTION_ATTEMPT_DELAY = 0.25

SockAddr = tuple[socket.AddressFamily, Any]


async def dial(target: Address, deadline: float = math.inf) -> socket.socket:
    """Open a non-blocking connection to one target by `deadline` (trio time).

    A unix path or an IP literal is one address. A host name is resolved on every dial
    (so DNS changes are followed), and every address it resolves to is tried, in the
    order `interleave` gives, "Happy Eyeballs" style (RFC 8305 sections 4-5): the next
    attempt starts as soon as the previous one fails, or after 250 ms while it is still
    pending; the first to connect wins and the others are closed.

    Raises TimeoutError ("connect timeout") when nothing connected by the deadline, or an
    OSError naming, for a name with several addresses, each address and its failure
    (`[::1]:5432: Connection refused; 127.0.0.1:5432: connect timeout`)."""
    if target.path is not None:
        return await _connect(socket.AF_UNIX, target.path, deadline)
    resolved = _numeric_address(target.host, target.port)
    if resolved is not None:
        return await _connect(resolved[0], resolved[1], deadline)
    infos = None
    with trio.move_on_at(deadline):
        infos = await trio.socket.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    if infos is None:
        raise TimeoutError(errno.ETIMEDOUT, "connect timeout")
    addresses = interleave(infos)
    if not addresses:
        raise OSError(errno.EHOSTUNREACH, f"no address for {target.host}")
    if len(addresses) == 1:
        return await _connect(addresses[0][0], addresses[0][1], deadline)
    return await _connect_first(addresses, deadline)


def interleave(infos: Sequence[tuple[Any, ...]]) -> list[SockAddr]:
    """getaddrinfo results as (family, sockaddr) in the order to try them, RFC 8305
    section 4: the family of the first result first, then alternate families, each
    family's addresses in their own order. Repeated addresses are tried once."""
    by_family: dict[Any, list[SockAddr]] = {}
    seen = set()
    for info in infos:
        family, sockaddr = info[0], info[4]
        if (family, sockaddr) not in seen:
            seen.add((family, sockaddr))
            by_family.setdefault(family, []).append((family, sockaddr))
    queues = list(by_family.values())  # dicts keep insertion order: the first family first
    ordered: list[SockAddr] = []
    while queues:
        ordered.extend(queue.pop(0) for queue in queues)
        queues = [queue for queue in queues if queue]
    return ordered


async def _connect_first(addresses: list[SockAddr], deadline: float) -> socket.socket:
    """Race connection attempts to `addresses` (RFC 8305 section 5); the first to connect."""
    winner: socket.socket | None = None
    failures: dict[int, OSError] = {}

    async def attempt(index: int, family: socket.AddressFamily, sockaddr: Any, failed: trio.Event) -> None:
        nonlocal winner
        try:
            sock = await _connect(family, sockaddr, deadline)
        except OSError as exc:
            failures[index] = exc
            failed.set()
            return
        if winner is None:
            winner = sock
            nursery.cancel_scope.cancel()
        else:  # connected in the same instant as another: not needed
            sock.close()

    try:
        async with trio.open_nursery() as nursery:
            for index, (family, sockaddr) in enumerate(addresses):
                if trio.current_time() >= deadline:
                    break
                failed = trio.Event()
                nursery.start_soon(attempt, index, family, sockaddr, failed)
                with trio.move_on_after(CONNECTION_ATTEMPT_DELAY):
                    await failed.wait()
    except BaseException:
        if winner is not None:
            winner.close()
        raise
    if winner is not None:
        return winner
    problems = [f"{format_sockaddr(addresses[i][1])}: {failures[i].strerror or failures[i]}" for i in sorted(failures)]
    if len(failures) < len(addresses):
        problems.append(f"{len(addresses) - len(failures)} more not tried before the deadline")
    if all(isinstance(exc, TimeoutError) for exc in failures.values()):
        raise TimeoutError(errno.ETIMEDOUT, "; ".join(problems))
    first = failures[min(failures)]
    raise OSError(first.errno, "; ".join(problems))


async def _connect(family: socket.AddressFamily, sockaddr: Any, deadline: float) -> socket.socket:
    """A connected non-blocking socket to one address; TimeoutError ("connect timeout")
    past `deadline`. A deadline costs a cancel scope only where there is a wait: a local
    target has usually accepted before connect() returns."""
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        try:
            sock.connect(sockaddr)
        except BlockingIOError as exc:
            if exc.errno != errno.EINPROGRESS:
                # EAGAIN is a refusal, not a connection in progress: a unix socket whose
                # accept queue is full, or no local port left. Waiting would hand back a
                # socket that never connected.
                why = "its accept queue is full" if family == socket.AF_UNIX else "no local port is free"
                raise OSError(exc.errno, why) from None
            # A local target has often accepted by now: ask again before waiting.
            error = sock.connect_ex(sockaddr)
            if error not in (0, errno.EISCONN):
                if error not in (errno.EINPROGRESS, errno.EALREADY):
                    raise OSError(error, os.strerror(error)) from None
                with trio.move_on_at(deadline) as waiting:
                    await trio.lowlevel.wait_writable(sock)
                if waiting.cancelled_caught:
                    raise TimeoutError(errno.ETIMEDOUT, "connect timeout") from None
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
                sock.getpeername()  # ENOTCONN (an OSError) if it did not connect after all
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return sock


@functools.lru_cache(maxsize=256)
def _numeric_address(host: str, port: int) -> tuple[socket.AddressFamily, Any] | None:
    """(family, sockaddr) for an IP address literal, worked out once; None for a name."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        return None
    return infos[0][0], infos[0][4]
