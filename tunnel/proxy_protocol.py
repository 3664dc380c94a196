"""Build the PROXY protocol version 2 header a server tunnel sends its target before any forwarded bytes."""

from __future__ import annotations

import ipaddress
import struct
from typing import TypeAlias

__all__ = [
    "CMD_LOCAL",
    "CMD_PROXY",
    "FAM_UNSPEC",
    "MAX_LENGTH",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_SSL",
    "SIGNATURE",
    "TCP_OVER_IPV4",
    "TCP_OVER_IPV6",
    "VERSION_2",
    "v2_header",
]

# Numbers and layout from HAProxy's "The PROXY protocol Versions 1 & 2", section 2.2:
#
#   signature[12] | ver_cmd | fam | len (uint16, network order) | address block | TLVs
#
# `len` counts every byte after the 16-byte fixed part (addresses and TLVs).
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_2 = 0x20  # high nibble of ver_cmd
CMD_LOCAL = 0x00  # low nibble of ver_cmd
CMD_PROXY = 0x01
FAM_UNSPEC = 0x00  # AF_UNSPEC, transport UNSPEC
TCP_OVER_IPV4 = 0x11  # AF_INET, STREAM
TCP_OVER_IPV6 = 0x21  # AF_INET6, STREAM

PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

MAX_LENGTH = 0xFFFF  # the largest value a uint16 length field (header `len` or a TLV length) can hold
_NOT_VERIFIED = 1  # any non-zero verify value means "not verified"; 1 is X509_V_ERR_UNSPECIFIED

_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def v2_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    tls_version: str | None = None,
    common_name: str | None = None,
    verified: bool = True,
    cert_in_session: bool = False,
) -> bytes:
    """Return the complete PROXY v2 header for a TCP connection from `source` to `destination`.

    `source` is the TLS client's (address, port) and `destination` the tunnel listener's own;
    addresses must be IP literals, not host names.  Only the first two items are read, so the
    4-tuples Python returns for IPv6 sockets work at run time too.

    Addresses:
    - Two IPv4 addresses, or two IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``, as a dual-stack
      listener reports IPv4 peers), or one of each, are sent as TCP over IPv4 (family 0x11).
    - Two IPv6 addresses are sent as TCP over IPv6 (family 0x21); a mapped address paired with
      a genuine IPv6 address stays IPv6, since both already are of that family.
    - A plain IPv4 address paired with a genuine IPv6 address raises ValueError.
    - If either endpoint is None (e.g. a unix socket listener) the header is LOCAL with family
      UNSPEC and nothing after the fixed 16 bytes: the spec tells the receiver to discard the
      rest of a LOCAL header, so TLVs are left out rather than relied on.  The TLS arguments are
      still validated.

    TLS: when `tls_version` or `common_name` is given, one PP2_TYPE_SSL TLV follows the
    addresses.  Its client byte has PP2_CLIENT_SSL and PP2_CLIENT_CERT_CONN set (the tunnel
    always requires a client certificate), plus PP2_CLIENT_CERT_SESS when `cert_in_session`; its
    verify field is 0 when `verified` and 1 otherwise.  It contains a PP2_SUBTYPE_SSL_VERSION
    sub-TLV (US-ASCII) when `tls_version` is given, then a PP2_SUBTYPE_SSL_CN sub-TLV (UTF-8)
    when `common_name` is given.  Empty strings are encoded as empty values; pass None to leave
    a field out.

    Raises ValueError for anything that cannot be encoded: a host that is not an IP address, a
    port outside 0-65535, mixed address families, a non-ASCII TLS version, a CN that is not
    valid Unicode, or a TLV or header whose length would not fit its 16-bit length field.
    """
    tlvs = _ssl_tlv(tls_version, common_name, verified=verified, cert_in_session=cert_in_session)
    src = None if source is None else _endpoint(source, "source")
    dst = None if destination is None else _endpoint(destination, "destination")
    if src is None or dst is None:
        return SIGNATURE + struct.pack("!BBH", VERSION_2 | CMD_LOCAL, FAM_UNSPEC, 0)

    family, src_address, dst_address = _same_family(src[0], dst[0])
    body = src_address.packed + dst_address.packed + struct.pack("!HH", src[1], dst[1]) + tlvs
    if len(body) > MAX_LENGTH:
        raise ValueError(f"PROXY v2 header would carry {len(body)} bytes after its fixed part; at most {MAX_LENGTH}")
    return SIGNATURE + struct.pack("!BBH", VERSION_2 | CMD_PROXY, family, len(body)) + body


def _endpoint(endpoint: tuple[str, int], role: str) -> tuple[_IPAddress, int]:
    host, port = endpoint[0], endpoint[1]
    if not isinstance(host, str):
        raise ValueError(f"{role} address must be a string, not {type(host).__name__}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{role} address {host!r} is not an IP address") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_LENGTH:
        raise ValueError(f"{role} port {port!r} is not an integer from 0 to {MAX_LENGTH}")
    return address, port


def _unmapped(address: _IPAddress) -> _IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same_family(src: _IPAddress, dst: _IPAddress) -> tuple[int, _IPAddress, _IPAddress]:
    src4, dst4 = _unmapped(src), _unmapped(dst)
    if isinstance(src4, ipaddress.IPv4Address) and isinstance(dst4, ipaddress.IPv4Address):
        return TCP_OVER_IPV4, src4, dst4
    if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
        return TCP_OVER_IPV6, src, dst
    raise ValueError(f"source {src} and destination {dst} are different address families")


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > MAX_LENGTH:
        raise ValueError(f"TLV 0x{kind:02x} value is {len(value)} bytes; at most {MAX_LENGTH} fit")
    return struct.pack("!BH", kind, len(value)) + value


def _ssl_tlv(tls_version: str | None, common_name: str | None, *, verified: bool, cert_in_session: bool) -> bytes:
    if tls_version is None and common_name is None:
        return b""
    client = PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN
    if cert_in_session:
        client |= PP2_CLIENT_CERT_SESS
    value = struct.pack("!BI", client, 0 if verified else _NOT_VERIFIED)
    if tls_version is not None:
        try:
            version = tls_version.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"TLS version {tls_version!r} is not US-ASCII") from None
        value += _tlv(PP2_SUBTYPE_SSL_VERSION, version)
    if common_name is not None:
        try:
            cn = common_name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"common name {common_name!r} cannot be encoded as UTF-8") from None
        value += _tlv(PP2_SUBTYPE_SSL_CN, cn)
    return _tlv(PP2_TYPE_SSL, value)
