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
    finished = 0

    async def pump(src: Stream, dst: Stream, scope: trio.CancelScope) -> None:
        nonlocal last_activity, finished
        src_name, dst_name = ("client", "target") if src is accepted else ("target", "client")
        try:
            while True:
                try:
                    data = await src.receive_some()
                except StreamBroken as exc:
                    raise _Ended(f"{src_name}: {exc}") from exc
                if not data:
                    break
                try:
                    await dst.send_all(data)
                except StreamBroken as exc:
                    raise _Ended(f"{dst_name}: {exc}") from exc
                last_activity = trio.current_time()
                if src is accepted:
                    stats.bytes_in += len(data)
                else:
                    stats.bytes_out += len(data)
            if src.unclean_eof:
                stats.unclean = True
            try:
                await dst.send_eof()
            except StreamBroken as exc:
                raise _Ended(f"{dst_name}: {exc}") from exc
        except _Ended as exc:
            if not stats.why:
                stats.why = str(exc)
            scope.cancel()
            return
        last_activity = trio.current_time()
        finished += 1
        if finished == 2:
            stats.why = "both sides closed"
            scope.cancel()

    async def watchdog(scope: trio.CancelScope, idle_seconds: float) -> None:
        while True:
            await trio.sleep_until(last_activity + idle_seconds)
            if trio.current_time() >= last_activity + idle_seconds:
                if not stats.why:
                    stats.why = f"idle for {idle_seconds:g}s"
                scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, accepted, dialled, nursery.cancel_scope)
        nursery.start_soon(pump, dialled, accepted, nursery.cancel_scope)
        if idle_timeout:
            nursery.start_soon(watchdog, nursery.cancel_scope, idle_timeout)


class _Ended(Exception):
    """One side broke; the message says which and how."""
