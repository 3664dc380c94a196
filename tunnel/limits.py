"""Who may take a slot: global caps, per source, per identity.

A silent crowd (sockets that connect and never send a byte) must not shut allowed clients
out. Before this module a tunnel had one cap, `max_connections`, on every accepted socket:
about 2,300 silent sockets from one address, each replaced as `handshake_timeout` closed
it, kept every slot busy, and an allowed client waited about a handshake timeout in the
kernel's backlog, or failed. So a server tunnel's TCP connections now pass a `Gate`:

- **Two kinds of slot.** A connection holds one of `max_connections` from accept until it
  ends; while it is still in its TLS handshake (not yet admitted by the `allow` rules) it
  also holds one of `max_handshakes`. Once admitted it gives the handshake slot back and
  is never displaced by a handshaking one.
- **Per source** (the peer's IPv4 address, or its IPv6 /64: one host or one customer
  network, `source_key`): at most `per_source.handshakes` handshaking connections and
  `per_source.connections` connections in all. A new socket from a source at either cap
  is reset at once, never queued: a crowd from one source is cut at its cap, and its
  excess costs an accept and a close, not a slot.
- **Full** (no free handshake slot, or every connection slot taken while some are still
  handshaking): a new socket is still accepted and judged, because leaving it in the
  kernel's backlog would leave an allowed client queued behind the crowd. It displaces a
  handshaking connection when (1) that connection has been handshaking for at least
  `DISPLACE_AFTER` (a second, or half of `handshake_timeout` if that is shorter: a real
  handshake takes milliseconds, so a burst of allowed clients is never cut by its own
  newer members; they wait for one another instead), and (2) its source holds more
  handshake slots than the newcomer's: the oldest such connection of the source holding
  the most is closed, which brings sources towards equal shares. If handshaking
  connections are old enough but none belongs to a heavier source, the newcomer's own
  source is the crowd and the newcomer is reset. If none is old enough yet, the accept
  loop holds the new socket until a slot frees or one ages (at most `DISPLACE_AFTER`).
  So an allowed client from an address not in the crowd gets a slot at once while the
  crowd's sockets are older than `DISPLACE_AFTER`, and within `DISPLACE_AFTER` at worst.
- **Every slot held by admitted connections**: nothing can be displaced; new sockets wait
  in the kernel's backlog as before, and are taken as connections end.
- **Per identity**: an admitted connection whose identity (as logged: `cn=app1`) already
  holds `per_identity_connections` is refused after the handshake, before the target is
  dialled, so one allowed client cannot hold every slot and starve the others.

A `unix:` listener has no source address, and a client tunnel's accepted connections are
its own local applications (it asks no handshake of them): both keep the global caps only,
and wait in the backlog when full. Resets and displacements are counted and logged, but
summed (`ShedLog`), so a flood cannot flood the log too.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from tunnel.config import Limits
from tunnel.logs import event
from tunnel.outcomes import Outcome

# Longest a real handshake is expected to take before it may be displaced (see above).
DISPLACE_AFTER = 1.0

# Why a new socket was reset at once, or a handshaking one closed (metric label values).
SHED_SOURCE_HANDSHAKES = "per_source.handshakes"
SHED_SOURCE_CONNECTIONS = "per_source.connections"
SHED_FULL = "handshake slots full"  # its source already holds as many as any other
SHED_DISPLACED = "displaced"  # a handshaking connection closed to make room


def source_key(address: Any) -> str | None:
    """The source a peer address counts against: an IPv4 address as itself, an IPv6
    address as its /64 (`2001:db8:1:2::/64`: the smallest network a site is given, RFC
    6177 / RFC 7421, so one host cannot dodge the cap by using many addresses), an
    IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, a dual-stack listener) as the IPv4
    address. None for a unix socket (no address) or anything unparseable."""
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return None
    try:
        ip = ipaddress.ip_address(address[0].split("%", 1)[0])  # drop an IPv6 zone (%eth0)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def displace_after(limits: Limits) -> float:
    """Seconds a connection must have been handshaking before a newcomer may displace it."""
    return min(DISPLACE_AFTER, limits.handshake_timeout / 2)


@dataclass(eq=False)
class Ticket:
    """One accepted connection's slots. `cancel_scope` is the connection's: cancelled when
    it is displaced (then `displaced` is set and its slots are already given back)."""

    source: str | None
    since: float
    handshaking: bool
    identity: str | None = None
    displaced: bool = False
    released: bool = False
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Gate:
    """The slot counts of one tunnel, and the decisions described in the module docstring.

    `admit` is called by the accept loop for each new socket, `admitted` when the allow
    rules have admitted its peer, `release` when it ends. `wait_for_room` parks the accept
    loop until `admit` can decide (rather than leave the socket in the backlog)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.connections = 0
        self.handshakes: dict[Ticket, None] = {}  # in the handshake, oldest first
        self._source_handshakes: dict[str, dict[Ticket, None]] = {}
        self._source_connections: Counter[str] = Counter()
        self._identities: Counter[str] = Counter()
        self._lot = trio.lowlevel.ParkingLot()

    def set_limits(self, limits: Limits) -> None:
        """New limits (a reload), in force for the next decision. Connections over a lowered
        cap are not closed; they count until they end."""
        self.limits = limits
        self._lot.unpark_all()

    def _room(self, handshake: bool) -> bool:
        if self.connections >= self.limits.max_connections:
            return False
        return not handshake or len(self.handshakes) < self.limits.max_handshakes

    def _oldest_displaceable(self) -> float:
        """When the oldest handshaking connection may be displaced (inf if none)."""
        for ticket in self.handshakes:
            return ticket.since + displace_after(self.limits)
        return math.inf

    async def wait_for_room(self, *, handshake: bool, displace: bool) -> None:
        """Return once `admit` can decide now: a free slot, or (with `displace`) a
        handshaking connection old enough to displace. `handshake`: the connection will
        need a handshake slot (a server tunnel); `displace`: its source is known (TCP)."""
        while True:
            if self._room(handshake):
                return
            until = self._oldest_displaceable() if displace and handshake else math.inf
            if until <= trio.current_time():
                return
            with trio.move_on_at(until):
                await self._lot.park()

    def admit(self, source: str | None, now: float, *, handshake: bool) -> Ticket | str | None:
        """Decide on a new socket from `source` (None: no per-source caps, no displacing).

        Returns a Ticket (admitted; for a server tunnel, in its handshake), a reason (one of
        the SHED_* strings: reset it now), or None (no room now: `wait_for_room`, then ask
        again)."""
        limits = self.limits
        if source is not None and handshake:
            held = self._source_handshakes.get(source, {})
            if self._source_connections[source] >= limits.per_source_connections:
                return SHED_SOURCE_CONNECTIONS
            if len(held) >= limits.per_source_handshakes:
                return SHED_SOURCE_HANDSHAKES
        if not self._room(handshake):
            if source is None or not handshake or not self.handshakes:
                return None
            victim = self._victim(source, now)
            if victim is None:
                return None
            if victim == SHED_FULL:
                return SHED_FULL
            assert isinstance(victim, Ticket)
            self._displace(victim)
        # A client tunnel's connection counts against max_connections only.
        ticket = Ticket(source=source if handshake else None, since=now, handshaking=handshake)
        self.connections += 1
        if handshake:
            self.handshakes[ticket] = None
        if source is not None and handshake:
            self._source_connections[source] += 1
            self._source_handshakes.setdefault(source, {})[ticket] = None
        return ticket

    def _victim(self, source: str, now: float) -> Ticket | str | None:
        """The handshaking connection a newcomer from `source` displaces; SHED_FULL when
        the old enough ones all belong to sources no heavier than the newcomer's; None when
        none is old enough yet."""
        cutoff = now - displace_after(self.limits)
        mine = len(self._source_handshakes.get(source, {}))
        best: Ticket | None = None
        best_rank = (0, 0.0)
        any_old = False
        for tickets in self._source_handshakes.values():
            oldest = next(iter(tickets))
            if oldest.since > cutoff:
                continue
            any_old = True
            if len(tickets) <= mine:
                continue
            rank = (len(tickets), -oldest.since)
            if best is None or rank > best_rank:
                best, best_rank = oldest, rank
        if best is not None:
            return best
        return SHED_FULL if any_old else None

    def _displace(self, victim: Ticket) -> None:
        self._forget(victim)
        victim.displaced = True
        victim.cancel_scope.cancel()

    def admitted(self, ticket: Ticket, identity: str) -> Outcome | None:
        """The allow rules admitted this connection's peer, `identity` (as logged): it
        gives back its handshake slot. Why to refuse it (per_identity_connections), or None."""
        if ticket.released:
            return None  # displaced meanwhile: its cancellation is on its way
        self._end_handshake(ticket)
        if self._identities[identity] >= self.limits.per_identity_connections:
            return Outcome(
                "too many connections",
                f"too many connections for {identity} ({self._identities[identity]} open,"
                " limits.per_identity_connections)",
            )
        self._identities[identity] += 1
        ticket.identity = identity
        return None

    def release(self, ticket: Ticket) -> None:
        """The connection has ended (a no-op for one displaced, or released before)."""
        if not ticket.released:
            self._forget(ticket)

    def _end_handshake(self, ticket: Ticket) -> None:
        if ticket.handshaking:
            ticket.handshaking = False
            self.handshakes.pop(ticket, None)
            if ticket.source is not None:
                held = self._source_handshakes.get(ticket.source)
                if held is not None:
                    held.pop(ticket, None)
                    if not held:
                        del self._source_handshakes[ticket.source]
            self._lot.unpark_all()

    def _forget(self, ticket: Ticket) -> None:
        self._end_handshake(ticket)
        ticket.released = True
        self.connections -= 1
        if ticket.source is not None and ticket.source in self._source_connections:
            self._source_connections[ticket.source] -= 1
            if self._source_connections[ticket.source] <= 0:
                del self._source_connections[ticket.source]
        if ticket.identity is not None:
            self._identities[ticket.identity] -= 1
            if self._identities[ticket.identity] <= 0:
                del self._identities[ticket.identity]
        self._lot.unpark_all()

    def source_connections(self, source: str) -> int:
        return self._source_connections[source]

    def identity_connections(self, identity: str) -> int:
        return self._identities[identity]


class ShedLog:
    """Log lines for resets and displacements that a flood cannot turn into a flood: the
    first after a quiet `interval` is logged at once (with its peer), the rest are summed
    and `summary` gives one line per interval while they go on."""

    def __init__(self, tunnel: str, interval: float = 5.0) -> None:
        self.tunnel = tunnel
        self.interval = interval
        self._counts: Counter[str] = Counter()
        self._sources: Counter[str] = Counter()
        self._quiet_since = -math.inf  # when the last line was logged

    def record(self, reason: str, source: str | None, peer: str, now: float) -> None:
        if now - self._quiet_since >= self.interval and not self._counts:
            self._quiet_since = now
            event(
                logging.WARNING,
                "shed",
                "shed tunnel=%s peer=%s: %s (more are summed every %gs)",
                self.tunnel,
                peer,
                reason,
                self.interval,
                tunnel=self.tunnel,
                peer=peer,
                reason=reason,
            )
            return
        self._counts[reason] += 1
        if source is not None:
            self._sources[source] += 1

    def summary(self, now: float) -> None:
        """Log what was summed since the last line, if anything."""
        if not self._counts:
            return
        total = sum(self._counts.values())
        reasons = ", ".join(f"{reason} {count}" for reason, count in self._counts.most_common())
        top = self._sources.most_common(1)
        busiest = f"; busiest source {top[0][0]} ({top[0][1]})" if top else ""
        event(
            logging.WARNING,
            "shed_summary",
            "shed tunnel=%s %d more connections in %.0fs: %s%s",
            self.tunnel,
            total,
            now - self._quiet_since,
            reasons,
            busiest,
            tunnel=self.tunnel,
            count=total,
            reasons=dict(self._counts),
            busiest=top[0][0] if top else None,
        )
        self._counts.clear()
        self._sources.clear()
        self._quiet_since = now

    async def report_every_interval(self) -> None:
        """Run `summary` every `interval` seconds (until cancelled; then once more)."""
        try:
            while True:
                await trio.sleep(self.interval)
                self.summary(trio.current_time())
        finally:
            self.summary(trio.current_time())
