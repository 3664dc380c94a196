"""The byte pump: copy both directions between two streams, pass half-close through,
reap idle connections, count bytes, and say why it ended."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from tunnel.streams import Stream, StreamBroken


@dataclass
class RelayStats:
    """Bytes each way and how the relay ended; updated live so status can read it."""

    bytes_in: int = 0  # from the accepted side to the target side
    bytes_out: int = 0  # from the target side back to the accepted side
    why: str = ""
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
    last_activity = trio.current_time()

    async def pump(src: Stream, dst: Stream, direction: str) -> None:
        nonlocal last_activity
        while True:
            try:
                data = await src.receive_some()
            except StreamBroken as exc:
                side = "client" if src is accepted else "target"
                raise _Ended(f"{side}: {exc}") from exc
            if not data:
                break
            try:
                await dst.send_all(data)
            except StreamBroken as exc:
                side = "target" if dst is dialled else "client"
                raise _Ended(f"{side}: {exc}") from exc
            last_activity = trio.current_time()
            if direction == "in":
                stats.bytes_in += len(data)
            else:
                stats.bytes_out += len(data)
        if src.unclean_eof:
            stats.unclean = True
        try:
            await dst.send_eof()
        except StreamBroken as exc:
            side = "target" if dst is dialled else "client"
            raise _Ended(f"{side}: {exc}") from exc
        last_activity = trio.current_time()

    async def watchdog(scope: trio.CancelScope, idle_seconds: float) -> None:
        while True:
            await trio.sleep_until(last_activity + idle_seconds)
            if trio.current_time() >= last_activity + idle_seconds:
                stats.why = f"idle for {idle_seconds:g}s"
                scope.cancel()
                return

    try:
        async with trio.open_nursery() as nursery:
            pumps_done = trio.Event()
            finished = 0

            async def run_pump(src: Stream, dst: Stream, direction: str) -> None:
                nonlocal finished
                await pump(src, dst, direction)
                finished += 1
                if finished == 2:
                    pumps_done.set()

            nursery.start_soon(run_pump, accepted, dialled, "in")
            nursery.start_soon(run_pump, dialled, accepted, "out")
            if idle_timeout:
                nursery.start_soon(watchdog, nursery.cancel_scope, idle_timeout)
            await pumps_done.wait()
            nursery.cancel_scope.cancel()
            stats.why = "both sides closed"
    except BaseExceptionGroup as group:
        ended, rest = group.split(_Ended)
        if rest is not None:
            raise
        assert ended is not None
        stats.why = str(_first_leaf(ended))


class _Ended(Exception):
    """One side broke; the message says which and how."""


def _first_leaf(group: BaseExceptionGroup[_Ended]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
