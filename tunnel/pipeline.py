"""What the two sides' connection lives share (tunnel/server_side.py, client_side.py):
dialling the target with the log line a failure needs, relaying, and ending both streams
the way the relay's outcome calls for. `Host` is what a connection needs of its tunnel."""

from __future__ import annotations

import math
import socket
from typing import Protocol

import trio

from tunnel.config import Address, TunnelConfig
from tunnel.connection import Connection, Story
from tunnel.dial import TargetUnavailable, dial_any
from tunnel.identity import Identity
from tunnel.limits import Gate
from tunnel.metrics import Metrics
from tunnel.outcomes import BOTH_SIDES_CLOSED, CLOSED_BY_THE_DAEMON, DRAIN_TIMEOUT, Outcome, side_broke
from tunnel.relay import relay
from tunnel.state import TunnelState
from tunnel.streams import PlainStream, StreamBroken, TLSStream


class Endings:
    """How a tunnel ends its connections: the SIGTERM drain's deadline, an abort (a second
    signal), and the connections ending cleanly right now (which an abort cuts short)."""

    def __init__(self) -> None:
        self.drain_deadline = math.inf  # when the drain ends open connections (trio time)
        self.aborted = False
        self._ending: set[trio.CancelScope] = set()

    def abort(self) -> None:
        self.aborted = True
        for scope in self._ending:
            scope.cancel()

    async def end_cleanly(self, *streams: PlainStream | TLSStream) -> None:
        """End both sides as a normal end of stream (an idle timeout or the SIGTERM drain
        deadline: ends the daemon decides on, not failures): a FIN on a plain side, a TLS
        close_notify then a FIN on a TLS side, as a peer closing would; see Stream.end.
        For the drain deadline this runs in an already cancelled scope, hence the shield;
        `abort` (a second signal) cuts it short, and each side gets at most a second
        (a peer that reads nothing can hold up a close_notify), then a reset."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1) as scope:
            self._ending.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        nursery.start_soon(stream.end)
            finally:
                self._ending.discard(scope)
        for stream in streams:
            stream.abort()  # a no-op for a side that has ended


class Host(Protocol):
    """What a connection's life needs of its tunnel."""

    name: str
    metrics: Metrics
    story: Story
    endings: Endings
    gate: Gate

    @property
    def state(self) -> TunnelState:
        """The state in force now (a reload may have replaced the connection's own)."""
        ...


async def dial_target(
    host: Host, config: TunnelConfig, conn: Connection, client: PlainStream | TLSStream
) -> tuple[socket.socket, Address] | None:
    """A connection to the first target that answers; None (logged, client closed) if none."""
    started = trio.current_time()
    try:
        result = await dial_any(config.targets, config.limits.connect_timeout)
    except TargetUnavailable as exc:
        host.story.target_down(conn, str(exc))
        client.abort()
        return None
    host.metrics.connect_seconds(host.name, trio.current_time() - started)
    return result


async def relay_and_close(
    host: Host,
    accepted: PlainStream | TLSStream,
    dialled: PlainStream | TLSStream,
    conn: Connection,
    idle_timeout: float | None,
) -> None:
    """Relay until it ends, then end both streams as the outcome calls for and log it:
    both sides closed, a clean end (idle, drain deadline), or a reset for the rest."""
    stats = conn.stats
    try:
        await relay(accepted, dialled, idle_timeout=idle_timeout, stats=stats)
    finally:
        endings = host.endings
        if stats.end is None and endings.drain_deadline <= trio.current_time() and not endings.aborted:
            stats.end = DRAIN_TIMEOUT
        if stats.end is BOTH_SIDES_CLOSED:
            accepted.close()
            dialled.close()
        elif stats.end is not None and (stats.end.label == "idle" or stats.end is DRAIN_TIMEOUT):
            await endings.end_cleanly(accepted, dialled)
        else:
            # A broken side, a reload that no longer admits the peer, an abort: a
            # reset, so that neither end can take it for a normal end.
            accepted.abort()
            dialled.abort()
        if stats.end is None:
            stats.end = CLOSED_BY_THE_DAEMON
        host.story.closed(conn)


async def send_before_relay(
    host: Host, conn: Connection, accepted: PlainStream | TLSStream, dialled: PlainStream | TLSStream, data: bytes
) -> bool:
    """Send `data` to the dialled side before the relay starts (a PROXY header, a
    PostgreSQL client's first message). False if that side broke: both ends reset, the
    end logged."""
    try:
        await dialled.send_all(data)
    except StreamBroken as exc:
        conn.stats.end = side_broke("target", exc)
        accepted.abort()
        dialled.abort()
        host.story.closed(conn)
        return False
    return True


def refuse(
    host: Host,
    conn: Connection,
    stream: PlainStream | TLSStream,
    reason: Outcome,
    identity: Identity | None = None,
    **where: str,
) -> None:
    """Log the refusal and close with a reset, so the peer cannot take it for a normal end."""
    host.story.refused(conn, reason, identity, **where)
    stream.abort()
