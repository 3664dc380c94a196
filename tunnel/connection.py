"""One connection's record (who, since when, bytes, how it ended) and its story: the
opened, refused, target unavailable and closed lines of the log, and the counters that
go with them. Every line and count is rendered from an outcome (tunnel/outcomes.py)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from tunnel.config import MetricsConfig
from tunnel.identity import Identity
from tunnel.limits import Ticket
from tunnel.logs import event
from tunnel.metrics import Metrics
from tunnel.outcomes import Outcome, target_unavailable
from tunnel.relay import RelayStats
from tunnel.unix_peers import PeerCredentials

_ids = itertools.count(1)


@dataclass
class Connection:
    """One accepted connection, as the daemon and status pages see it."""

    peer: str
    since: float
    id: int = field(default_factory=lambda: next(_ids))
    identity: Identity | None = None
    peer_chain: tuple[bytes, ...] = ()  # as the peer presented it, leaf first (DER)
    address: Any = None  # the peer's socket address as accept() returned it
    credentials: PeerCredentials | None = None  # a unix: listener's peer process (SO_PEERCRED)
    stats: RelayStats = field(default_factory=RelayStats)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed_logged: bool = False  # its end is logged and counted (closed, or target unavailable)
    ticket: Ticket | None = None  # its slots (tunnel/limits.py)
    handed_over: bool = False  # routed to another tunnel on its listen address (by SNI)
    metrics_identity: str | None = None  # its identity label once opened (metrics.per_identity), or None


class Story:
    """The log lines and counters of one tunnel's connections."""

    def __init__(self, tunnel: str, metrics: Metrics, settings: MetricsConfig | None = None) -> None:
        """`settings`: the tunnel's `metrics:` keys (replaced on reload), which say whether
        connections are counted per identity too (tunnel/metrics.py)."""
        self.tunnel = tunnel
        self.metrics = metrics
        self.settings = settings or MetricsConfig()

    def _identity_label(self, identity: Identity | None) -> str | None:
        """The `identity` label to count `identity` under, or None: not counted per identity
        (metrics.per_identity off, or no identity known)."""
        if identity is None or not self.settings.per_identity:
            return None
        return self.metrics.identity_label(self.tunnel, identity.describe(), self.settings.max_identities)

    def opened(self, conn: Connection, tls: str, **where: str) -> None:
        self.metrics.opened(self.tunnel)
        conn.metrics_identity = self._identity_label(conn.identity)
        if conn.metrics_identity is not None:
            self.metrics.identity_opened(self.tunnel, conn.metrics_identity)
        identity = conn.identity.describe() if conn.identity else "-"
        place = " ".join(f"{key}={value}" for key, value in where.items())
        event(
            logging.INFO,
            "opened",
            "opened tunnel=%s peer=%s identity=%s tls=%s %s",
            self.tunnel,
            conn.peer,
            identity,
            tls,
            place,
            tunnel=self.tunnel,
            peer=conn.peer,
            identity=identity,
            tls=tls,
            **where,
        )

    def refused(self, conn: Connection, reason: Outcome, identity: Identity | None = None, **where: str) -> None:
        self.metrics.refused(self.tunnel, reason)
        label = self._identity_label(identity)
        if label is not None:
            self.metrics.identity_refused(self.tunnel, label, reason)
        who = f" identity={identity.describe()}" if identity else ""
        place = "".join(f" {key}={value}" for key, value in where.items())
        event(
            logging.WARNING,
            "refused",
            "refused: %s tunnel=%s peer=%s%s%s",
            reason.text,
            self.tunnel,
            conn.peer,
            who,
            place,
            tunnel=self.tunnel,
            peer=conn.peer,
            identity=identity.describe() if identity else None,
            reason=reason.text,
            **where,
        )

    def _identity_closed(self, conn: Connection, end: Outcome) -> None:
        label = conn.metrics_identity or self._identity_label(conn.identity)
        if label is not None:
            self.metrics.identity_closed(self.tunnel, label, end)

    def closing(self, conn: Connection, why: Outcome) -> None:
        """A reload no longer admits an open connection's peer: say so before it is cut."""
        identity = conn.identity.describe() if conn.identity else None
        event(
            logging.WARNING,
            "closing",
            "closing tunnel=%s peer=%s identity=%s: %s",
            self.tunnel,
            conn.peer,
            identity or "-",
            why.text,
            tunnel=self.tunnel,
            peer=conn.peer,
            identity=identity,
            reason=why.text,
        )

    def target_down(self, conn: Connection, why: str) -> None:
        conn.closed_logged = True
        conn.stats.end = target_unavailable(why)
        self.metrics.closed(self.tunnel, conn.stats.end)
        self._identity_closed(conn, conn.stats.end)
        event(
            logging.ERROR,
            "target_unavailable",
            "target unavailable tunnel=%s peer=%s: %s",
            self.tunnel,
            conn.peer,
            why,
            tunnel=self.tunnel,
            peer=conn.peer,
            identity=conn.identity.describe() if conn.identity else None,
            reason=why,
        )

    def closed(self, conn: Connection) -> None:
        conn.closed_logged = True
        stats = conn.stats
        end = stats.end
        assert end is not None
        self.metrics.closed(self.tunnel, end)
        self._identity_closed(conn, end)
        identity = conn.identity.describe() if conn.identity else "-"
        duration = trio.current_time() - conn.since
        event(
            logging.INFO,
            "closed",
            "closed tunnel=%s peer=%s identity=%s in=%d out=%d duration=%.3fs why=%s%s",
            self.tunnel,
            conn.peer,
            identity,
            stats.bytes_in,
            stats.bytes_out,
            duration,
            end.text,
            " (unclean close: no TLS close_notify)" if stats.unclean else "",
            tunnel=self.tunnel,
            peer=conn.peer,
            identity=identity,
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            duration=round(duration, 3),
            reason=end.text,
            unclean=stats.unclean,
        )
