"""tunnel/limits.py on its own: the source a peer counts against, and the Gate's decisions
(per source, displacing, per identity), with the clock given by hand."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tunnel.config import Limits
from tunnel.limits import (
    SHED_DISPLACED,
    SHED_FULL,
    SHED_SOURCE_CONNECTIONS,
    SHED_SOURCE_HANDSHAKES,
    Gate,
    ShedLog,
    Ticket,
    source_key,
)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        (("192.0.2.7", 443), "192.0.2.7"),
        (("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 443, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2::1", 443, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:3::1", 443, 0, 0), "2001:db8:1:3::/64"),
        (("fe80::1%eth0", 443, 0, 2), "fe80::/64"),
        (("::ffff:192.0.2.7", 443, 0, 0), "192.0.2.7"),
        ("", None),  # an unnamed unix peer
        ("/run/x.sock", None),
        (("not an address", 1), None),
    ],
)
def test_source_key_groups_ipv6_by_64_and_leaves_unix_out(address: object, key: str | None) -> None:
    assert source_key(address) == key


def test_every_address_of_one_ipv6_64_is_one_source() -> None:
    keys = {source_key((f"2001:db8:0:7:{i:x}::{i:x}", 1, 0, 0)) for i in range(1, 200)}
    assert keys == {"2001:db8:0:7::/64"}


def limits(**caps: Any) -> Limits:
    return Limits(handshake_timeout=10.0, **caps)  # displace after 1 s


def admit(gate: Gate, source: str | None, now: float = 0.0) -> Ticket:
    ticket = gate.admit(source, now, handshake=True)
    assert isinstance(ticket, Ticket), ticket
    return ticket


def test_a_source_at_its_handshake_cap_is_shed_and_others_still_get_in() -> None:
    gate = Gate(limits(max_connections=50, max_handshakes=20, per_source_handshakes=3))
    crowd = [admit(gate, "10.0.0.1") for _ in range(3)]
    assert gate.admit("10.0.0.1", 0.0, handshake=True) == SHED_SOURCE_HANDSHAKES
    admit(gate, "10.0.0.2")
    gate.admitted(crowd[0], "cn=app1")  # out of the handshake: its source may start another
    admit(gate, "10.0.0.1")


def test_a_source_at_its_connection_cap_is_shed_even_when_admitted() -> None:
    gate = Gate(limits(max_connections=50, per_source_connections=2, per_source_handshakes=2))
    for _ in range(2):
        assert gate.admitted(admit(gate, "10.0.0.1"), "cn=app1") is None
    assert gate.admit("10.0.0.1", 0.0, handshake=True) == SHED_SOURCE_CONNECTIONS
    admit(gate, "10.0.0.2")


def test_full_handshake_slots_displace_the_oldest_of_the_heaviest_source() -> None:
    gate = Gate(limits(max_connections=50, max_handshakes=4, per_source_handshakes=4))
    a = [admit(gate, "10.0.0.1", now=t) for t in (0.0, 0.1, 0.2)]
    b = admit(gate, "10.0.0.2", now=0.05)
    newcomer = admit(gate, "10.0.0.9", now=5.0)
    assert a[0].displaced
    assert a[0].cancel_scope.cancel_called
    assert not any(t.displaced for t in (a[1], a[2], b, newcomer))
    assert len(gate.handshakes) == 4
    assert gate.connections == 4
    gate.release(a[0])  # the displaced connection's own end: already given back
    assert gate.connections == 4


def test_a_newcomer_from_a_source_as_heavy_as_any_is_shed_not_displacing() -> None:
    gate = Gate(limits(max_connections=50, max_handshakes=4, per_source_handshakes=4))
    for source in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"):
        admit(gate, source)
    assert gate.admit("10.0.0.1", 5.0, handshake=True) == SHED_FULL
    assert not any(t.displaced for t in gate.handshakes)


def test_young_handshakes_are_not_displaced_the_newcomer_waits() -> None:
    gate = Gate(limits(max_connections=50, max_handshakes=2))
    first = admit(gate, "10.0.0.1", now=0.0)
    admit(gate, "10.0.0.1", now=0.0)
    assert gate.admit("10.0.0.2", 0.5, handshake=True) is None  # a burst: wait for room
    assert not first.displaced
    admit(gate, "10.0.0.2", now=1.0)  # one second in: displaceable
    assert first.displaced


def test_admitted_connections_are_never_displaced() -> None:
    gate = Gate(limits(max_connections=3, max_handshakes=3))
    held = [admit(gate, f"10.0.0.{i}") for i in range(3)]
    for ticket in held:
        assert gate.admitted(ticket, "cn=app1") is None
    assert gate.admit("10.0.0.9", 100.0, handshake=True) is None
    assert not any(t.displaced for t in held)
    gate.release(held[0])
    admit(gate, "10.0.0.9", now=100.0)


def test_a_full_tunnel_with_a_silent_socket_lets_a_new_source_displace_it() -> None:
    """Connection slots full, mostly with admitted connections: the one handshaking is
    displaced by a newcomer, not left to hold the last slot for handshake_timeout."""
    gate = Gate(limits(max_connections=3, max_handshakes=3))
    for i in range(2):
        gate.admitted(admit(gate, f"10.0.0.{i}"), "cn=app1")
    silent = admit(gate, "10.0.0.66", now=0.0)
    admit(gate, "10.0.0.9", now=2.0)
    assert silent.displaced


def test_per_identity_cap_refuses_the_next_and_frees_on_release() -> None:
    gate = Gate(limits(max_connections=50, per_identity_connections=2))
    first = admit(gate, "10.0.0.1")
    assert gate.admitted(first, "cn=app1") is None
    assert gate.admitted(admit(gate, "10.0.0.1"), "cn=app1") is None
    why = gate.admitted(admit(gate, "10.0.0.1"), "cn=app1")
    assert why is not None
    assert why.label == "too many connections"
    assert why.text.startswith("too many connections for cn=app1")
    assert gate.admitted(admit(gate, "10.0.0.1"), "uri=spiffe://x/app2") is None
    gate.release(first)
    assert gate.admitted(admit(gate, "10.0.0.1"), "cn=app1") is None


def test_unix_and_client_sockets_keep_only_the_global_caps() -> None:
    gate = Gate(limits(max_connections=3, max_handshakes=2, per_source_handshakes=1, per_source_connections=1))
    unix = [admit(gate, None), admit(gate, None)]  # no source: per_source does not apply
    assert gate.admit(None, 100.0, handshake=True) is None  # full: wait, never displace
    assert not any(t.displaced for t in unix)
    client = gate.admit("127.0.0.1", 0.0, handshake=False)  # a client tunnel: no handshake slot
    assert isinstance(client, Ticket)
    assert gate.admit("127.0.0.1", 0.0, handshake=False) is None  # max_connections


def test_lowered_limits_apply_to_the_next_decision() -> None:
    gate = Gate(limits(max_connections=50, per_source_handshakes=5))
    for _ in range(3):
        admit(gate, "10.0.0.1")
    gate.set_limits(limits(max_connections=50, per_source_handshakes=2))
    assert gate.admit("10.0.0.1", 0.0, handshake=True) == SHED_SOURCE_HANDSHAKES
    gate.set_limits(limits(max_connections=50, per_source_handshakes=4))
    admit(gate, "10.0.0.1")


def test_shed_log_logs_the_first_then_sums(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    shed = ShedLog("edge", interval=5.0)
    for i in range(1000):
        shed.record(SHED_SOURCE_HANDSHAKES, "10.0.0.1", f"10.0.0.1:{i}", now=i / 1000)
    shed.record(SHED_DISPLACED, "10.0.0.2", "10.0.0.2:1", now=1.0)
    shed.summary(now=5.0)
    shed.summary(now=10.0)  # nothing new: no line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0] == "shed tunnel=edge peer=10.0.0.1:0: per_source.handshakes (more are summed every 5s)"
    assert lines[1].startswith("shed tunnel=edge 1000 more connections in 5s: per_source.handshakes 999, displaced 1")
    assert "busiest source 10.0.0.1 (999)" in lines[1]
