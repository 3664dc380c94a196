"""The byte pump: copy both directions between two streams, pass half-close through,
reap idle connections, count bytes, and say why it ended."""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from tunnel.outcomes import BOTH_SIDES_CLOSED, Outcome, idle, side_broke
from tunnel.streams import Stream, StreamBroken


@dataclass
class RelayStats:
    """Bytes each way and how the relay ended; updated live so status can read it."""

    bytes_in: int = 0  # from the accepted side to the target side
    bytes_out: int = 0  # from the target side back to the accepted side
    end: Outcome | None = None  # how it ended, once it has
    unclean: bool = False


async def relay(
    accepted: Stream,
    dialled: Stream,
    *,
    idle_timeout: float | None,
    stats: RelayStats,
) -> None:
    """Pump until both directions have ended, one side breaks, or nothing moves for
    `idle_timeout` seconds. Does not close the streams: the caller owns them."""
    finished = 0
    # Idle timeout: the nursery's deadline, pushed forward as bytes move: no watchdog
    # task (and one task fewer: the accepted side's pump runs in this one). Moving a
    # deadline costs a few microseconds, so it moves at most once per `slack`; the
    # connection is reaped after between idle and idle_for + slack of silence, never sooner.
    idle_for = idle_timeout or math.inf
    slack = min(idle_for / 10, 1.0)
    clock = trio.lowlevel.current_clock()  # read once per message: skip the lookups
    pushed = clock.current_time()

    async def pump(src: Stream, dst: Stream, scope: trio.CancelScope) -> None:
        nonlocal finished, pushed
        inbound = src is accepted
        src_name, dst_name = ("client", "target") if inbound else ("target", "client")
        try:
            while True:
                try:
                    # A view of a scratch buffer, no copy: send_all consumes it (encrypts
                    # it, or copies what the socket does not take) before it first yields.
                    data = await src.receive_view()
                except StreamBroken as exc:
                    raise _Ended(side_broke(src_name, exc)) from exc
                if not data:
                    break
                try:
                    await dst.send_all(data)
                except StreamBroken as exc:
                    raise _Ended(side_broke(dst_name, exc)) from exc
                now = clock.current_time()
                if now - pushed >= slack:
                    pushed = now
                    scope.deadline = now + idle_for + slack
                if inbound:
                    stats.bytes_in += len(data)
                else:
                    stats.bytes_out += len(data)
            if src.unclean_eof:
                stats.unclean = True
            try:
                await dst.send_eof()
            except StreamBroken as exc:
                raise _Ended(side_broke(dst_name, exc)) from exc
        except _Ended as exc:
            if stats.end is None:
                stats.end = exc.outcome
            scope.cancel()
            return
        pushed = trio.current_time()
        scope.deadline = pushed + idle_for + slack
        finished += 1
        if finished == 2:
            stats.end = BOTH_SIDES_CLOSED
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.cancel_scope.deadline = pushed + idle_for + slack
        nursery.start_soon(pump, dialled, accepted, nursery.cancel_scope)
        await pump(accepted, dialled, nursery.cancel_scope)
    scope = nursery.cancel_scope
    if scope.cancelled_caught and stats.end is None and scope.deadline <= trio.current_time():
        stats.end = idle(idle_for)


class _Ended(Exception):
    """One side broke; the outcome says which and how."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome
