"""Unit tests for tunnel.proxy_protocol, checked against a PROXY v2 parser written here from the spec."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.proxy_protocol import v2_header

# --------------------------------------------------------------------------------------------
# An independent parser, written straight from "The PROXY protocol Versions 1 & 2", section 2.2.
# It shares no code or constants with the encoder: every number below is retyped from the spec.
# --------------------------------------------------------------------------------------------

SPEC_SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
ADDRESS_BLOCK_SIZE = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}  # by address family (high nibble of byte 14)
LOCAL, PROXY = 0x0, 0x1
AF_UNSPEC, AF_INET, AF_INET6 = 0x0, 0x1, 0x2
STREAM = 0x1
TYPE_SSL, SUBTYPE_VERSION, SUBTYPE_CN = 0x20, 0x21, 0x22
CLIENT_SSL, CLIENT_CERT_CONN, CLIENT_CERT_SESS = 0x01, 0x02, 0x04

TLVs = tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class ProxyHeader:
    version: int
    command: int
    family: int
    transport: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: TLVs


@dataclass(frozen=True)
class SSLInfo:
    client: int
    verify: int
    subtlvs: TLVs


def parse_tlvs(data: bytes) -> TLVs:
    """Split `data` into (type, value) pairs; it must be exactly a sequence of whole TLVs."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ValueError(f"truncated TLV header at offset {offset}")
        kind, length_hi, length_lo = data[offset], data[offset + 1], data[offset + 2]
        length = length_hi * 256 + length_lo
        value = data[offset + 3 : offset + 3 + length]
        if len(value) != length:
            raise ValueError(f"TLV 0x{kind:02x} claims {length} bytes, {len(value)} remain")
        found.append((kind, value))
        offset += 3 + length
    return tuple(found)


def parse_v2(data: bytes) -> tuple[ProxyHeader, int]:
    """Parse one PROXY v2 header from the start of `data`; return it and how many bytes it used."""
    if len(data) < 16:
        raise ValueError("shorter than the 16-byte fixed part")
    if data[:12] != SPEC_SIGNATURE:
        raise ValueError("bad signature")
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ValueError(f"version {version}")
    if command not in (LOCAL, PROXY):
        raise ValueError(f"command {command}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family not in ADDRESS_BLOCK_SIZE:
        raise ValueError(f"family {family}")
    length = int.from_bytes(data[14:16], "big")
    end = 16 + length
    if len(data) < end:
        raise ValueError(f"length says {length} bytes follow, only {len(data) - 16} do")
    body = data[16:end]
    address_size = ADDRESS_BLOCK_SIZE[family]
    if len(body) < address_size:
        raise ValueError("address block truncated")

    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if command == PROXY and family in (AF_INET, AF_INET6):
        width = 4 if family == AF_INET else 16
        make = ipaddress.IPv4Address if family == AF_INET else ipaddress.IPv6Address
        src_addr = make(body[0:width])
        dst_addr = make(body[width : 2 * width])
        src_port = int.from_bytes(body[2 * width : 2 * width + 2], "big")
        dst_port = int.from_bytes(body[2 * width + 2 : 2 * width + 4], "big")
        source, destination = (str(src_addr), src_port), (str(dst_addr), dst_port)
    header = ProxyHeader(version, command, family, transport, source, destination, parse_tlvs(body[address_size:]))
    return header, end


def ssl_info(header: ProxyHeader) -> SSLInfo:
    """Decode the single PP2_TYPE_SSL TLV: client (uint8), verify (uint32), then sub-TLVs."""
    values = [value for kind, value in header.tlvs if kind == TYPE_SSL]
    assert len(values) == 1, header.tlvs
    value = values[0]
    assert len(value) >= 5
    (verify,) = struct.unpack("!I", value[1:5])
    return SSLInfo(client=value[0], verify=verify, subtlvs=parse_tlvs(value[5:]))


# --------------------------------------------------------------------------------------------
# Exact bytes, worked out by hand from the spec.
# --------------------------------------------------------------------------------------------

# TCP/IPv4 192.0.2.1:56324 -> 198.51.100.7:443, TLSv1.3, CN "alice", verified, certificate on this connection.
KNOWN_IPV4 = (
    b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # signature
    b"\x21"  # version 2, command PROXY
    b"\x11"  # AF_INET, STREAM
    b"\x00\x26"  # 38 bytes follow: 12 address + 3 TLV header + 23 SSL value
    b"\xc0\x00\x02\x01"  # 192.0.2.1
    b"\xc6\x33\x64\x07"  # 198.51.100.7
    b"\xdc\x04"  # 56324
    b"\x01\xbb"  # 443
    b"\x20\x00\x17"  # PP2_TYPE_SSL, 23 bytes: 1 client + 4 verify + 10 version + 8 CN
    b"\x03"  # PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
    b"\x00\x00\x00\x00"  # verify: 0 = verified
    b"\x21\x00\x07TLSv1.3"  # PP2_SUBTYPE_SSL_VERSION
    b"\x22\x00\x05alice"  # PP2_SUBTYPE_SSL_CN
)
LOCAL_HEADER = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a\x20\x00\x00\x00"


def test_known_ipv4_example_exact_bytes() -> None:
    header = v2_header(("192.0.2.1", 56324), ("198.51.100.7", 443), tls_version="TLSv1.3", common_name="alice")
    assert header == KNOWN_IPV4


def test_known_ipv4_example_without_tls_exact_bytes() -> None:
    header = v2_header(("10.0.0.1", 1), ("10.0.0.2", 65535))
    assert header == (
        b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a\x21\x11\x00\x0c"
        b"\x0a\x00\x00\x01\x0a\x00\x00\x02\x00\x01\xff\xff"
    )


def test_parser_reads_the_hand_written_example() -> None:
    header, used = parse_v2(KNOWN_IPV4 + b"GET / HTTP/1.1\r\n")
    assert used == len(KNOWN_IPV4)
    assert header == ProxyHeader(
        version=2,
        command=PROXY,
        family=AF_INET,
        transport=STREAM,
        source=("192.0.2.1", 56324),
        destination=("198.51.100.7", 443),
        tlvs=((TYPE_SSL, b"\x03\x00\x00\x00\x00\x21\x00\x07TLSv1.3\x22\x00\x05alice"),),
    )
    assert ssl_info(header) == SSLInfo(
        client=CLIENT_SSL | CLIENT_CERT_CONN,
        verify=0,
        subtlvs=((SUBTYPE_VERSION, b"TLSv1.3"), (SUBTYPE_CN, b"alice")),
    )


@pytest.mark.parametrize(
    "broken",
    [
        KNOWN_IPV4[:15],  # shorter than the fixed part
        b"X" + KNOWN_IPV4[1:],  # signature
        KNOWN_IPV4[:12] + b"\x11" + KNOWN_IPV4[13:],  # version 1
        KNOWN_IPV4[:-1],  # length promises one byte more than there is
        KNOWN_IPV4[:14] + b"\x00\x27" + KNOWN_IPV4[16:] + b"\x00",  # a stray byte inside the TLV area
    ],
    ids=["short", "signature", "version", "truncated", "stray-byte"],
)
def test_parser_rejects_malformed_headers(broken: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the parser's messages are not under test
        parse_v2(broken)


# --------------------------------------------------------------------------------------------
# Round trips through the independent parser.
# --------------------------------------------------------------------------------------------


def test_ipv4_round_trip() -> None:
    data = v2_header(("203.0.113.9", 40000), ("192.0.2.80", 8443), tls_version="TLSv1.2", common_name="app1")
    header, used = parse_v2(data)
    assert used == len(data)
    assert (header.version, header.command, header.family, header.transport) == (2, PROXY, AF_INET, STREAM)
    assert header.source == ("203.0.113.9", 40000)
    assert header.destination == ("192.0.2.80", 8443)
    assert ssl_info(header).subtlvs == ((SUBTYPE_VERSION, b"TLSv1.2"), (SUBTYPE_CN, b"app1"))


def test_ipv6_round_trip() -> None:
    data = v2_header(("2001:db8::1", 50000), ("2001:db8:0:1::443", 443), tls_version="TLSv1.3", common_name="app2")
    assert data[13] == 0x21
    header, used = parse_v2(data)
    assert used == len(data)
    assert (header.command, header.family, header.transport) == (PROXY, AF_INET6, STREAM)
    assert header.source == ("2001:db8::1", 50000)
    assert header.destination == ("2001:db8:0:1::443", 443)
    info = ssl_info(header)
    assert info.client == CLIENT_SSL | CLIENT_CERT_CONN
    assert info.verify == 0
    assert info.subtlvs == ((SUBTYPE_VERSION, b"TLSv1.3"), (SUBTYPE_CN, b"app2"))


def test_ipv6_address_block_is_36_bytes() -> None:
    data = v2_header(("::1", 1), ("::2", 2))
    assert data[14:16] == b"\x00\x24"
    assert data[16:] == bytes(15) + b"\x01" + bytes(15) + b"\x02" + b"\x00\x01\x00\x02"


def test_ipv6_socket_four_tuples_are_accepted() -> None:
    peer: Any = ("2001:db8::7", 5000, 0, 0)  # what getpeername() returns for AF_INET6
    header, _ = parse_v2(v2_header(peer, ("2001:db8::8", 443)))
    assert header.source == ("2001:db8::7", 5000)


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        ("::ffff:192.0.2.1", "::ffff:198.51.100.7"),
        ("::ffff:192.0.2.1", "198.51.100.7"),
        ("192.0.2.1", "::ffff:198.51.100.7"),
    ],
)
def test_ipv4_mapped_ipv6_is_sent_as_ipv4(source: str, destination: str) -> None:
    data = v2_header((source, 1234), (destination, 443))
    assert data[13] == 0x11
    header, used = parse_v2(data)
    assert used == len(data) == 16 + 12
    assert header.family == AF_INET
    assert header.source == ("192.0.2.1", 1234)
    assert header.destination == ("198.51.100.7", 443)


def test_mapped_address_paired_with_real_ipv6_stays_ipv6() -> None:
    header, _ = parse_v2(v2_header(("::ffff:192.0.2.1", 1234), ("2001:db8::1", 443)))
    assert header.family == AF_INET6
    assert header.source is not None
    assert ipaddress.ip_address(header.source[0]) == ipaddress.IPv6Address("::ffff:192.0.2.1")
    assert header.source[1] == 1234
    assert header.destination == ("2001:db8::1", 443)


@pytest.mark.parametrize(
    ("source", "destination"),
    [(None, ("192.0.2.1", 443)), (("192.0.2.1", 5000), None), (None, None)],
    ids=["no-source", "no-destination", "neither"],
)
def test_missing_endpoint_gives_local_with_no_payload(
    source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> None:
    data = v2_header(source, destination, tls_version="TLSv1.3", common_name="alice", cert_in_session=True)
    assert data == LOCAL_HEADER
    header, used = parse_v2(data + b"payload")
    assert used == 16
    assert (header.command, header.family, header.transport) == (LOCAL, AF_UNSPEC, 0)
    assert header.tlvs == ()


# --------------------------------------------------------------------------------------------
# Lengths and TLV layout.
# --------------------------------------------------------------------------------------------

LENGTH_CASES: list[tuple[tuple[str, int], tuple[str, int], dict[str, Any]]] = [
    (("192.0.2.1", 1), ("192.0.2.2", 2), {}),
    (("192.0.2.1", 1), ("192.0.2.2", 2), {"tls_version": "TLSv1.3"}),
    (("192.0.2.1", 1), ("192.0.2.2", 2), {"common_name": "x" * 300}),
    (("2001:db8::1", 1), ("2001:db8::2", 2), {}),
    (("2001:db8::1", 1), ("2001:db8::2", 2), {"tls_version": "TLSv1.2", "common_name": "ü" * 200}),
]


@pytest.mark.parametrize(("source", "destination", "tls"), LENGTH_CASES)
def test_length_field_equals_the_remainder(
    source: tuple[str, int], destination: tuple[str, int], tls: dict[str, Any]
) -> None:
    data = v2_header(source, destination, **tls)
    assert int.from_bytes(data[14:16], "big") == len(data) - 16
    _, used = parse_v2(data + b"\x00" * 7)
    assert used == len(data)


def test_ssl_tlv_contains_the_sub_tlvs() -> None:
    data = v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tls_version="TLSv1.3", common_name="a" * 300)
    tlv_area = data[16 + 12 :]
    assert tlv_area[0] == TYPE_SSL
    # The SSL TLV's own length runs to the very end: the sub-TLVs are inside it, not beside it.
    assert int.from_bytes(tlv_area[1:3], "big") == len(tlv_area) - 3 == 1 + 4 + (3 + 7) + (3 + 300)
    header, _ = parse_v2(data)
    assert [kind for kind, _ in header.tlvs] == [TYPE_SSL]
    assert ssl_info(header).subtlvs == ((SUBTYPE_VERSION, b"TLSv1.3"), (SUBTYPE_CN, b"a" * 300))


def test_no_tls_arguments_means_no_tlvs() -> None:
    header, _ = parse_v2(v2_header(("192.0.2.1", 1), ("192.0.2.2", 2)))
    assert header.tlvs == ()


def test_common_name_without_version_still_gets_an_ssl_tlv() -> None:
    header, _ = parse_v2(v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), common_name="alice"))
    assert ssl_info(header).subtlvs == ((SUBTYPE_CN, b"alice"),)


def test_version_without_common_name() -> None:
    header, _ = parse_v2(v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tls_version="TLSv1.3"))
    assert ssl_info(header).subtlvs == ((SUBTYPE_VERSION, b"TLSv1.3"),)


def test_non_ascii_common_name_is_utf8() -> None:
    cn = "Zoë Ångström 日本 🚀"
    encoded = cn.encode("utf-8")
    assert len(encoded) != len(cn)
    data = v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tls_version="TLSv1.3", common_name=cn)
    assert data.endswith(b"\x22" + len(encoded).to_bytes(2, "big") + encoded)
    header, _ = parse_v2(data)
    assert dict(ssl_info(header).subtlvs)[SUBTYPE_CN].decode("utf-8") == cn


@pytest.mark.parametrize(
    ("cert_in_session", "client"),
    [(False, CLIENT_SSL | CLIENT_CERT_CONN), (True, CLIENT_SSL | CLIENT_CERT_CONN | CLIENT_CERT_SESS)],
)
def test_cert_sess_flag(cert_in_session: bool, client: int) -> None:
    data = v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tls_version="TLSv1.3", cert_in_session=cert_in_session)
    assert ssl_info(parse_v2(data)[0]).client == client


def test_unverified_client_has_non_zero_verify() -> None:
    verified = ssl_info(parse_v2(v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tls_version="TLSv1.3"))[0])
    unverified = ssl_info(
        parse_v2(v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tls_version="TLSv1.3", verified=False))[0]
    )
    assert verified.verify == 0
    assert unverified.verify != 0


# --------------------------------------------------------------------------------------------
# Values that cannot be encoded.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination"),
    [("192.0.2.1", "2001:db8::1"), ("2001:db8::1", "192.0.2.1"), ("::1", "127.0.0.1")],
)
def test_mixed_families_are_rejected(source: str, destination: str) -> None:
    with pytest.raises(ValueError, match="different address families"):
        v2_header((source, 1), (destination, 2))


@pytest.mark.parametrize("host", ["localhost", "", "192.0.2.256", "2001:db8::g"])
def test_non_ip_host_is_rejected(host: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address"):
        v2_header((host, 1), ("192.0.2.2", 2))


@pytest.mark.parametrize("port", [-1, 65536, True])
def test_bad_port_is_rejected(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        v2_header(("192.0.2.1", 1), ("192.0.2.2", port))


def test_non_ascii_tls_version_is_rejected() -> None:
    with pytest.raises(ValueError, match="US-ASCII"):
        v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tls_version="TLSv1.3é")


def test_unencodable_common_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), common_name="\ud800")


# Over IPv4 with only a CN: 12 address + 3 SSL TLV header + 5 client/verify + 3 CN header + n <= 65535.
LARGEST_CN = 65535 - 12 - 3 - 5 - 3


def test_largest_common_name_that_fits() -> None:
    data = v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), common_name="c" * LARGEST_CN)
    assert data[14:16] == b"\xff\xff"
    assert len(data) == 16 + 65535
    header, _ = parse_v2(data)
    assert dict(ssl_info(header).subtlvs)[SUBTYPE_CN] == b"c" * LARGEST_CN


@pytest.mark.parametrize(
    ("cn_length", "message"),
    [
        (LARGEST_CN + 1, "after its fixed part"),  # every TLV fits, the header length does not
        (65535, r"TLV 0x20 value"),  # the CN sub-TLV fits, the SSL TLV around it does not
        (65536, r"TLV 0x22 value"),  # the CN sub-TLV itself does not fit
    ],
)
def test_oversize_values_are_rejected(cn_length: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), common_name="c" * cn_length)


def test_oversize_values_are_rejected_even_for_local() -> None:
    with pytest.raises(ValueError, match=r"TLV 0x22 value"):
        v2_header(None, None, common_name="c" * 65536)


def test_multibyte_common_name_is_measured_in_bytes() -> None:
    # 21846 three-byte characters are 65538 bytes: too long, though only 21846 characters.
    with pytest.raises(ValueError, match=r"TLV 0x22 value"):
        v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), common_name="日" * 21846)


# --------------------------------------------------------------------------------------------
# Property: whatever goes in comes back out of the independent parser.
# --------------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.filter_too_much])

PORTS = st.integers(min_value=0, max_value=65535)
IPV4 = st.ip_addresses(v=4).map(str)


def not_mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None


IPV6 = st.ip_addresses(v=6).filter(not_mapped).map(str)
COMMON_NAMES = st.none() | st.text(max_size=300)
TLS_VERSIONS = st.none() | st.sampled_from(["TLSv1.2", "TLSv1.3"]) | st.text(st.characters(max_codepoint=127))


def expected_tlvs(tls_version: str | None, common_name: str | None, verified: bool, cert_in_session: bool) -> TLVs:
    if tls_version is None and common_name is None:
        return ()
    client = CLIENT_SSL | CLIENT_CERT_CONN | (CLIENT_CERT_SESS if cert_in_session else 0)
    value = bytes([client]) + (b"\x00\x00\x00\x00" if verified else b"\x00\x00\x00\x01")
    if tls_version is not None:
        raw = tls_version.encode("ascii")
        value += bytes([SUBTYPE_VERSION, len(raw) >> 8, len(raw) & 0xFF]) + raw
    if common_name is not None:
        raw = common_name.encode("utf-8")
        value += bytes([SUBTYPE_CN, len(raw) >> 8, len(raw) & 0xFF]) + raw
    return ((TYPE_SSL, value),)


@PROPERTY
@given(
    v6=st.booleans(),
    data=st.data(),
    ports=st.tuples(PORTS, PORTS),
    tls_version=TLS_VERSIONS,
    common_name=COMMON_NAMES,
    verified=st.booleans(),
    cert_in_session=st.booleans(),
    trailer=st.binary(max_size=32),
)
def test_round_trip_property(
    v6: bool,
    data: st.DataObject,
    ports: tuple[int, int],
    tls_version: str | None,
    common_name: str | None,
    verified: bool,
    cert_in_session: bool,
    trailer: bytes,
) -> None:
    addresses = IPV6 if v6 else IPV4
    source, destination = data.draw(addresses), data.draw(addresses)
    encoded = v2_header(
        (source, ports[0]),
        (destination, ports[1]),
        tls_version=tls_version,
        common_name=common_name,
        verified=verified,
        cert_in_session=cert_in_session,
    )
    header, used = parse_v2(encoded + trailer)
    assert used == len(encoded)
    assert header == ProxyHeader(
        version=2,
        command=PROXY,
        family=AF_INET6 if v6 else AF_INET,
        transport=STREAM,
        source=(source, ports[0]),
        destination=(destination, ports[1]),
        tlvs=expected_tlvs(tls_version, common_name, verified, cert_in_session),
    )
    if header.tlvs:
        info = ssl_info(header)
        if common_name is not None:
            assert dict(info.subtlvs)[SUBTYPE_CN].decode("utf-8") == common_name


@PROPERTY
@given(source=st.ip_addresses(v=4), destination=st.ip_addresses(v=4), ports=st.tuples(PORTS, PORTS), data=st.data())
def test_mapped_round_trip_property(
    source: ipaddress.IPv4Address,
    destination: ipaddress.IPv4Address,
    ports: tuple[int, int],
    data: st.DataObject,
) -> None:
    def spelled(address: ipaddress.IPv4Address) -> str:
        return data.draw(
            st.sampled_from(
                [str(address), f"::ffff:{address}", ipaddress.IPv6Address(0xFFFF << 32 | int(address)).exploded]
            )
        )

    header, _ = parse_v2(v2_header((spelled(source), ports[0]), (spelled(destination), ports[1])))
    assert header.family == AF_INET
    assert header.source == (str(source), ports[0])
    assert header.destination == (str(destination), ports[1])
