"""What the tunnels count, and its Prometheus text: counters pushed by the tunnels,
gauges read from the daemon's state at scrape time.

The tunnels call a `Metrics` object passed to them; `NoMetrics` does nothing (tests, and a
daemon without a status address). Bytes, active connections and certificate times are not
pushed at all: the collector reads them from the live tunnels when /metrics is scraped, so
the byte pump pays nothing for them.

Per identity (a tunnel file's `metrics: {per_identity: true}`): the tunnel_identity_*
series count the same events as tunnel_connections_{opened,refused,closed} and
tunnel_bytes, with an `identity` label (Identity.describe(), as the log lines show it:
`cn=app1`). They are series of their own, so that the per-tunnel ones keep their names
and labels whether it is on or not. At most `metrics.max_identities` distinct identities
per tunnel name get a label of their own, in the order they are first seen; the rest
count under identity="other" (OTHER), so a crowd of certificates cannot grow /metrics
without bound. A refusal is counted per identity only when the peer's certificate was
read (a failed handshake has no identity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tunnel.outcomes import Outcome

_M = TypeVar("_M", Counter, Histogram)

OTHER = "other"  # the identity label of those past metrics.max_identities

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Observed(Protocol):
    """What the collector reads off a tunnel at scrape time (tunnel.Tunnel is one)."""

    @property
    def name(self) -> str: ...
    @property
    def connections(self) -> Sized: ...
    @property
    def listening(self) -> bool: ...
    @property
    def handshaking(self) -> int: ...
    def bytes_moved(self) -> tuple[int, int]: ...
    @property
    def expiries(self) -> list[tuple[Path, datetime]]: ...
    @property
    def crl_next_update(self) -> datetime | None: ...
    @property
    def max_connections(self) -> int: ...
    def identity_bytes_open(self) -> Iterable[tuple[str, int, int]]: ...


class Metrics(Protocol):
    def opened(self, tunnel: str) -> None: ...
    def closed(self, tunnel: str, end: Outcome) -> None: ...
    def refused(self, tunnel: str, reason: Outcome) -> None: ...
    def shed(self, tunnel: str, reason: str) -> None: ...
    def handshake_seconds(self, tunnel: str, seconds: float) -> None: ...
    def connect_seconds(self, tunnel: str, seconds: float) -> None: ...
    def reloaded(self, ok: bool, when: float) -> None: ...
    def identity_label(self, tunnel: str, identity: str, limit: int) -> str: ...
    def identity_opened(self, tunnel: str, identity: str) -> None: ...
    def identity_refused(self, tunnel: str, identity: str, reason: Outcome) -> None: ...
    def identity_closed(self, tunnel: str, identity: str, end: Outcome) -> None: ...
    def identity_bytes(self, tunnel: str, identity: str, bytes_in: int, bytes_out: int) -> None: ...


class NoMetrics:
    """Counts nothing."""

    def opened(self, tunnel: str) -> None:
        pass

    def closed(self, tunnel: str, end: Outcome) -> None:
        pass

    def refused(self, tunnel: str, reason: Outcome) -> None:
        pass

    def shed(self, tunnel: str, reason: str) -> None:
        pass

    def handshake_seconds(self, tunnel: str, seconds: float) -> None:
        pass

    def connect_seconds(self, tunnel: str, seconds: float) -> None:
        pass

    def reloaded(self, ok: bool, when: float) -> None:
        pass

    def identity_label(self, tunnel: str, identity: str, limit: int) -> str:
        return identity

    def identity_opened(self, tunnel: str, identity: str) -> None:
        pass

    def identity_refused(self, tunnel: str, identity: str, reason: Outcome) -> None:
        pass

    def identity_closed(self, tunnel: str, identity: str, end: Outcome) -> None:
        pass

    def identity_bytes(self, tunnel: str, identity: str, bytes_in: int, bytes_out: int) -> None:
        pass


class PrometheusMetrics:
    """Metrics kept in a registry of its own (never the process-wide default)."""

    def __init__(self, tunnels: Callable[[], Sequence[Observed]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._opened = Counter("tunnel_connections_opened", "Connections relayed.", ["tunnel"], registry=r)
        self._closed = Counter(
            "tunnel_connections_closed", "Connections ended, by why.", ["tunnel", "reason"], registry=r
        )
        self._refused = Counter(
            "tunnel_connections_refused", "Connections refused, by reason.", ["tunnel", "reason"], registry=r
        )
        self._shed = Counter(
            "tunnel_connections_shed",
            "New connections reset at once (per_source.handshakes, per_source.connections, handshake slots full)"
            " and handshaking ones closed to make room (displaced), by reason.",
            ["tunnel", "reason"],
            registry=r,
        )
        self._handshake = Histogram(
            "tunnel_handshake_duration_seconds",
            "TLS handshake time.",
            ["tunnel"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self._connect = Histogram(
            "tunnel_connect_duration_seconds",
            "Time to connect to the target.",
            ["tunnel"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self._reloads = Counter("tunnel_reloads", "Reloads, by result.", ["result"], registry=r)
        self._last_reload_ok = Gauge("tunnel_last_reload_success", "1 if the last reload succeeded.", registry=r)
        self._last_reload_time = Gauge(
            "tunnel_last_reload_timestamp_seconds", "When the last reload was attempted.", registry=r
        )
        self._last_reload_ok.set(1)
        self._renewals = Counter(
            "tunnel_renewals",
            "Certificate renewals (tls.renew), by tunnel and result.",
            ["tunnel", "result"],
            registry=r,
        )
        self._identity_opened = Counter(
            "tunnel_identity_connections_opened",
            "Connections relayed, by peer identity (metrics.per_identity).",
            ["tunnel", "identity"],
            registry=r,
        )
        self._identity_refused = Counter(
            "tunnel_identity_connections_refused",
            "Connections refused after the peer's certificate was read, by peer identity and reason"
            " (metrics.per_identity).",
            ["tunnel", "identity", "reason"],
            registry=r,
        )
        self._identity_closed = Counter(
            "tunnel_identity_connections_closed",
            "Connections ended, by peer identity and why (metrics.per_identity).",
            ["tunnel", "identity", "reason"],
            registry=r,
        )
        self._identities: dict[str, dict[str, None]] = {}  # tunnel name → identities with a label of their own
        self._children: dict[tuple[object, ...], object] = {}
        self._live = _LiveCollector(tunnels)
        r.register(self._live)

    def opened(self, tunnel: str) -> None:
        self._child(self._opened, tunnel).inc()

    def closed(self, tunnel: str, end: Outcome) -> None:
        self._child(self._closed, tunnel, end.label).inc()

    def refused(self, tunnel: str, reason: Outcome) -> None:
        self._child(self._refused, tunnel, reason.label).inc()

    def shed(self, tunnel: str, reason: str) -> None:
        self._child(self._shed, tunnel, reason).inc()  # reason: one of tunnel.limits.SHED_*

    def handshake_seconds(self, tunnel: str, seconds: float) -> None:
        self._child(self._handshake, tunnel).observe(seconds)

    def connect_seconds(self, tunnel: str, seconds: float) -> None:
        self._child(self._connect, tunnel).observe(seconds)

    def identity_label(self, tunnel: str, identity: str, limit: int) -> str:
        """The `identity` label value for `identity` (Identity.describe()) on `tunnel`: the
        identity itself if it already has one, or if fewer than `limit` identities of the
        tunnel do (it takes one now); OTHER otherwise. Labels once given are kept for the
        life of the daemon (a counter's series never goes away), whatever a reload does."""
        named = self._identities.setdefault(tunnel, {})
        if identity in named:
            return identity
        if len(named) < limit:
            named[identity] = None
            return identity
        return OTHER

    def identity_opened(self, tunnel: str, identity: str) -> None:
        self._child(self._identity_opened, tunnel, identity).inc()

    def identity_refused(self, tunnel: str, identity: str, reason: Outcome) -> None:
        self._child(self._identity_refused, tunnel, identity, reason.label).inc()

    def identity_closed(self, tunnel: str, identity: str, end: Outcome) -> None:
        self._child(self._identity_closed, tunnel, identity, end.label).inc()

    def identity_bytes(self, tunnel: str, identity: str, bytes_in: int, bytes_out: int) -> None:
        """A connection labelled `identity` has ended having relayed these bytes (its bytes
        while open are read off the tunnel at scrape time)."""
        self._live.identity_ended(tunnel, identity, bytes_in, bytes_out)

    def _child(self, metric: _M, *labels: str) -> _M:
        """metric.labels(*labels), remembered: `labels` costs a few dozen calls, and every
        connection counts four times. The label values are bounded (tunnel names, reasons,
        at most metrics.max_identities identities and OTHER per tunnel)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]

    def forget(self, tunnel: Observed) -> None:
        """`tunnel` leaves the daemon's list for good (a reload stopped or moved it and it has
        drained): its bytes stay in its name's tunnel_bytes total, which never goes back."""
        self._live.forget(tunnel)

    def reloaded(self, ok: bool, when: float) -> None:
        self._reloads.labels("success" if ok else "failure").inc()
        self._last_reload_ok.set(1 if ok else 0)
        self._last_reload_time.set(when)

    def renewed(self, tunnel: str, ok: bool) -> None:
        """One renewal attempt of `tunnel`'s certificate (tls.renew), and how it went."""
        self._renewals.labels(tunnel, "success" if ok else "failure").inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Reads bytes, active connections and certificate times off the running tunnels.

    One series per tunnel name, however many Tunnel objects bear it: a reload that moves a
    tunnel to a new listen address starts a new object while the old one drains its
    connections. Counts and bytes add up over them (plus the bytes of those forgotten),
    `listening` is 1 if any accepts, certificate times are those of the first object of
    the name (the daemon lists the serving ones first)."""

    def __init__(self, tunnels: Callable[[], Sequence[Observed]]) -> None:
        self._tunnels = tunnels
        self._forgotten: dict[str, tuple[int, int]] = {}  # tunnel name → bytes in, out of dropped objects
        self._identity_ended: dict[tuple[str, str], tuple[int, int]] = {}  # (tunnel, identity) → bytes in, out

    def identity_ended(self, tunnel: str, identity: str, bytes_in: int, bytes_out: int) -> None:
        before_in, before_out = self._identity_ended.get((tunnel, identity), (0, 0))
        self._identity_ended[(tunnel, identity)] = (before_in + bytes_in, before_out + bytes_out)

    def forget(self, tunnel: Observed) -> None:
        bytes_in, bytes_out = tunnel.bytes_moved()
        before_in, before_out = self._forgotten.get(tunnel.name, (0, 0))
        self._forgotten[tunnel.name] = (before_in + bytes_in, before_out + bytes_out)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return list(self._collect())

    def _collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        tunnels = self._tunnels()
        active = GaugeMetricFamily("tunnel_active_connections", "Connections open now.", labels=["tunnel"])
        handshaking = GaugeMetricFamily(
            "tunnel_handshaking_connections",
            "Connections in their TLS handshake now (each holds one of limits.max_handshakes).",
            labels=["tunnel"],
        )
        listening = GaugeMetricFamily("tunnel_listening", "1 if the tunnel is accepting.", labels=["tunnel"])
        moved = CounterMetricFamily(
            "tunnel_bytes", "Bytes relayed: in = towards the target, out = back.", labels=["tunnel", "direction"]
        )
        not_after = GaugeMetricFamily(
            "tunnel_certificate_not_after_timestamp_seconds",
            "When each certificate a tunnel uses expires.",
            labels=["tunnel", "file"],
        )
        crl = GaugeMetricFamily(
            "tunnel_crl_next_update_timestamp_seconds", "When the tunnel's CRL must be replaced.", labels=["tunnel"]
        )
        cap = GaugeMetricFamily(
            "tunnel_max_connections",
            "limits.max_connections: connections the tunnel holds at most (compare tunnel_active_connections).",
            labels=["tunnel"],
        )
        identity_moved = CounterMetricFamily(
            "tunnel_identity_bytes",
            "Bytes relayed, by peer identity (metrics.per_identity): in = towards the target, out = back.",
            labels=["tunnel", "identity", "direction"],
        )
        identity_bytes = dict(self._identity_ended)
        by_name: dict[str, list[Observed]] = {}
        for tunnel in tunnels:
            by_name.setdefault(tunnel.name, []).append(tunnel)
        for name, group in by_name.items():
            active.add_metric([name], sum(len(tunnel.connections) for tunnel in group))
            handshaking.add_metric([name], sum(tunnel.handshaking for tunnel in group))
            listening.add_metric([name], 1 if any(tunnel.listening for tunnel in group) else 0)
            bytes_in, bytes_out = self._forgotten.get(name, (0, 0))
            for tunnel in group:
                more_in, more_out = tunnel.bytes_moved()
                bytes_in, bytes_out = bytes_in + more_in, bytes_out + more_out
            moved.add_metric([name, "in"], bytes_in)
            moved.add_metric([name, "out"], bytes_out)
            first = group[0]
            for path, when in first.expiries:
                not_after.add_metric([name, str(path)], when.timestamp())
            if first.crl_next_update is not None:
                crl.add_metric([name], first.crl_next_update.timestamp())
            cap.add_metric([name], first.max_connections)
            for tunnel in group:
                for identity, more_in, more_out in tunnel.identity_bytes_open():
                    so_far_in, so_far_out = identity_bytes.get((name, identity), (0, 0))
                    identity_bytes[(name, identity)] = (so_far_in + more_in, so_far_out + more_out)
        for (name, identity), (bytes_in, bytes_out) in identity_bytes.items():
            identity_moved.add_metric([name, identity, "in"], bytes_in)
            identity_moved.add_metric([name, identity, "out"], bytes_out)
        yield from (active, handshaking, listening, moved, not_after, crl, cap, identity_moved)


def merge_texts(texts: Sequence[str]) -> bytes:
    """Several workers' /metrics as one: counts and byte totals add up; timestamps take the
    latest; "all is well" gauges (listening, last reload success) take the worst."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, tuple[str, str]] = {}  # name → (type, help)
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    order: dict[str, list[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # per-process creation times mean nothing summed
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    order.setdefault(family.name, []).append(key)
                    samples[key] = sample.value
                else:
                    samples[key] = _combine(sample.name, samples[key], sample.value)
    lines = []
    for name, (kind, documentation) in families.items():
        lines.append(f"# HELP {name} {documentation}")
        lines.append(f"# TYPE {name} {kind}")
        for sample_name, labels in order.get(name, []):
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{label_text}}} {samples[(sample_name, labels)]!r}".replace("{}", ""))
    return ("\n".join(lines) + "\n").encode()


def _combine(name: str, a: float, b: float) -> float:
    if name.endswith("_timestamp_seconds"):
        return max(a, b)
    if name in ("tunnel_listening", "tunnel_last_reload_success"):
        return min(a, b)
    return a + b


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
