"""The order a host name's addresses are tried in (RFC 8305 section 4)."""

from __future__ import annotations

import socket

import pytest

from tunnel.dial import interleave

V4, V6 = socket.AF_INET, socket.AF_INET6


def info(ip: str) -> tuple[socket.AddressFamily, int, int, str, tuple[object, ...]]:
    if ":" in ip:
        return V6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, 5432, 0, 0)
    return V4, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, 5432)


@pytest.mark.parametrize(
    ("resolved", "tried"),
    [
        (["::1", "127.0.0.1"], ["::1", "127.0.0.1"]),
        (["127.0.0.1", "::1"], ["127.0.0.1", "::1"]),
        (["::1", "::2", "::3", "10.0.0.1"], ["::1", "10.0.0.1", "::2", "::3"]),
        (["10.0.0.1", "10.0.0.2", "::1", "::2"], ["10.0.0.1", "::1", "10.0.0.2", "::2"]),
        (["::1", "10.0.0.1", "::2", "10.0.0.2", "10.0.0.3"], ["::1", "10.0.0.1", "::2", "10.0.0.2", "10.0.0.3"]),
        (["10.0.0.1", "10.0.0.2"], ["10.0.0.1", "10.0.0.2"]),
        (["127.0.0.1", "127.0.0.1", "::1"], ["127.0.0.1", "::1"]),  # a repeat is tried once
        ([], []),
    ],
)
def test_addresses_alternate_families_starting_with_the_first_results(resolved: list[str], tried: list[str]) -> None:
    ordered = interleave([info(ip) for ip in resolved])
    assert [sockaddr[0] for _, sockaddr in ordered] == tried
    assert all(family == (V6 if ":" in sockaddr[0] else V4) for family, sockaddr in ordered)
