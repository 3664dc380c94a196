"""Reading a ClientHello's server name and ALPN protocols (tunnel/client_hello.py), from
ClientHellos OpenSSL really writes."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.client_hello import CLIENT_HELLO, MAX_CLIENT_HELLO, ClientHello, Reader, parse, unrecognized_name_alert


def client_hello(server_name: str | None, alpn: list[str] | None = None, *, tls12: bool = False) -> bytes:
    """The first flight of a stdlib (OpenSSL) client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def reframed(data: bytes, size: int) -> bytes:
    """The same handshake message cut into TLS records of at most `size` bytes."""
    body = data[5:]
    return b"".join(data[:3] + len(chunk).to_bytes(2, "big") + chunk for chunk in _chunks(body, size))


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("tls12", [False, True])
def test_the_server_name_and_alpn_of_an_openssl_client_hello_are_read(tls12: bool) -> None:
    hello = client_hello("Redis.Internal", ["postgresql", "h2"], tls12=tls12)
    assert parse(hello) == ClientHello("redis.internal", ("postgresql", "h2"))


def test_a_client_hello_without_sni_has_no_server_name() -> None:
    assert parse(client_hello(None)) == ClientHello(None, ())


def test_every_prefix_of_a_client_hello_asks_for_more() -> None:
    hello = client_hello("a.example")
    for end in range(len(hello)):
        assert parse(hello[:end]) is None


def test_a_client_hello_spread_over_several_records_is_read() -> None:
    hello = client_hello("spread.example", ["postgresql"])
    assert parse(reframed(hello, 50)) == ClientHello("spread.example", ("postgresql",))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL's SSLRequest
        bytes([22, 3, 3, 0, 0]),  # an empty record
        bytes([22, 3, 3, 0, 4, 2, 0, 0, 0]),  # a ServerHello first
        bytes([22, 3, 3, 0, 4, 1, 0xFF, 0xFF, 0xFF]),  # a 16 MiB ClientHello
    ],
)
def test_what_is_not_a_client_hello_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse(data)


def test_a_cut_short_client_hello_inside_a_complete_record_is_a_value_error() -> None:
    hello = client_hello("a.example")
    body = bytes([1]) + (2).to_bytes(3, "big") + b"\x03\x03"  # a ClientHello of 2 bytes: no random
    with pytest.raises(ValueError, match="cut short"):
        parse(hello[:3] + len(body).to_bytes(2, "big") + body)


@given(st.binary(max_size=600))
def test_any_bytes_give_a_client_hello_more_or_a_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse(data)


@given(st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=8))
def test_a_corrupted_client_hello_never_raises_anything_but_a_value_error(at: int, junk: bytes) -> None:
    hello = client_hello("fuzz.example", ["postgresql"])
    at %= len(hello)
    with contextlib.suppress(ValueError):
        parse(hello[:at] + junk + hello[at + len(junk) :])


def test_the_unrecognized_name_alert_is_a_fatal_alert_record() -> None:
    assert unrecognized_name_alert() == b"\x15\x03\x03\x00\x02\x02\x70"


def test_a_client_hello_in_one_byte_records_arriving_in_small_segments_is_read_once() -> None:
    """A ClientHello cut into 1-byte records (RFC 8446 section 5.1 allows it) arriving 64
    bytes at a time: each record is read once, not the whole opening again on every
    segment (which cost seconds of CPU for one hostile client; found in review)."""
    hello = client_hello("tiny.example", ["postgresql"])
    message = hello[5:]
    records = b"".join(hello[:3] + b"\x00\x01" + message[i : i + 1] for i in range(len(message)))
    reader = Reader()
    found = None
    for at in range(0, len(records), 64):
        found = reader.feed(records[at : at + 64])
        if found is not None:
            break
    assert found == ClientHello("tiny.example", ("postgresql",))
    assert reader.records == len(message)


def test_a_client_hello_longer_than_the_bound_is_refused_however_it_is_cut() -> None:
    body = bytes([CLIENT_HELLO]) + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    reader = Reader()
    for byte in body[:-1]:
        assert reader.feed(bytes([22, 3, 1, 0, 1, byte])) is None
    with pytest.raises(ValueError, match="a ClientHello of"):
        reader.feed(bytes([22, 3, 1, 0, 1, body[-1]]))
