"""What a TLS ClientHello asks for, read before any TLS is spoken: the server name (SNI)
and the ALPN protocols. Pure: bytes in, a ClientHello (or "more bytes", or ValueError)
out. The same job as nginx's ssl_preread and HAProxy's req.ssl_sni: a tunnel that shares
its listen address with others picks the one the client names before the handshake, so
each keeps its own certificate, CA, rules and limits.

Sources: RFC 8446 section 5.1 (records: type 22 is a handshake, at most 2^14 bytes of
plaintext each; a handshake message may span several records) and section 4.1.2 (the
ClientHello's layout, which TLS 1.2's RFC 5246 section 7.4.1.2 shares); RFC 6066
section 3 (server_name, extension 0: one host_name, ASCII, no trailing dot); RFC 7301
section 3.1 (application_layer_protocol_negotiation, extension 16).
"""

from __future__ import annotations

from dataclasses import dataclass

HANDSHAKE = 22
CLIENT_HELLO = 1
MAX_RECORD = 2**14 + 256  # RFC 8446 section 5.1: at most 2^14 bytes, a little slack for TLS 1.2
MAX_CLIENT_HELLO = 2**16  # a ClientHello longer than this is not one we serve (OpenSSL's own bound is near)
SERVER_NAME = 0
ALPN = 16


@dataclass(frozen=True)
class ClientHello:
    """`server_name`: the host_name of the SNI extension, lower-cased, None without one;
    `alpn`: the protocols offered, in the client's order."""

    server_name: str | None
    alpn: tuple[str, ...] = ()


class _Reader:
    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data = memoryview(data)
        self.at = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.data):
            raise ValueError(f"{self.what} is cut short")
        part = self.data[self.at : self.at + n]
        self.at += n
        return part

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> _Reader:
        return _Reader(self.take(self.number(length_size)), self.what)

    @property
    def done(self) -> bool:
        return self.at == len(self.data)


class Reader:
    """A ClientHello read as its bytes come: `feed` each chunk; every record is looked at
    once, so a ClientHello cut into many tiny records and sent in many small segments
    costs time in proportion to its size (re-reading it all from the start on every
    chunk cost the square: seconds of CPU for one hostile client)."""

    def __init__(self) -> None:
        self.data = bytearray()  # every byte fed so far
        self._at = 0  # where the next record starts in data
        self._message = bytearray()  # the handshake message's bytes so far
        self.records = 0  # TLS records read so far, each once

    def feed(self, chunk: bytes) -> ClientHello | None:
        """The ClientHello once complete, None while more bytes are needed; ValueError
        when they are not a TLS ClientHello (or one longer than MAX_CLIENT_HELLO)."""
        self.data += chunk
        data, message = self.data, self._message
        while self._at + 5 <= len(data):
            at = self._at
            kind, major, length = data[at], data[at + 1], int.from_bytes(data[at + 3 : at + 5], "big")
            if kind != HANDSHAKE or major != 3:
                raise ValueError("not a TLS handshake record")
            if not 0 < length <= MAX_RECORD:
                raise ValueError(f"a TLS record of {length} bytes")
            if at + 5 + length > len(data):
                return None
            message += data[at + 5 : at + 5 + length]
            self._at = at + 5 + length
            self.records += 1
            if len(message) >= 4:
                if message[0] != CLIENT_HELLO:
                    raise ValueError("the first handshake message is not a ClientHello")
                size = int.from_bytes(message[1:4], "big")
                if size > MAX_CLIENT_HELLO:
                    raise ValueError(f"a ClientHello of {size} bytes")
                if len(message) >= 4 + size:
                    return _client_hello(bytes(message[4 : 4 + size]))
        rest = data[self._at :]
        if rest[:1] and (rest[0] != HANDSHAKE or (len(rest) > 1 and rest[1] != 3)):
            raise ValueError("not a TLS handshake record")
        return None


def parse(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data` (the first bytes a TLS client sends): None
    while more bytes are needed, ValueError when they are not a TLS ClientHello (or one
    longer than MAX_CLIENT_HELLO)."""
    return Reader().feed(data)


def _client_hello(body: bytes) -> ClientHello:
    r = _Reader(body, "the ClientHello")
    r.take(2 + 32)  # legacy_version, random
    if len(r.vector(1).data) > 32:
        raise ValueError("a session id longer than 32 bytes")
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    if r.done:
        return ClientHello(None)  # no extensions at all (TLS 1.2 allows it)
    extensions = r.vector(2)
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while not extensions.done:
        kind = extensions.number(2)
        content = extensions.vector(2)
        if kind in seen:
            raise ValueError(f"extension {kind} twice")  # RFC 8446 section 4.2
        seen.add(kind)
        if kind == SERVER_NAME:
            server_name = _server_name(content)
        elif kind == ALPN:
            alpn = _alpn(content)
    return ClientHello(server_name, alpn)


def _server_name(content: _Reader) -> str | None:
    names = content.vector(2)
    found: str | None = None
    while not names.done:
        name_type = names.number(1)
        name = bytes(names.vector(2).data)
        if name_type != 0:
            continue  # host_name is the only type there is; others are skipped
        if found is not None:
            raise ValueError("two host names in server_name")  # RFC 6066 section 3
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("a server name that is not ASCII") from None
        if not text or not text.isprintable():
            raise ValueError("an empty or unprintable server name")
        found = text.lower().rstrip(".")
    return found


def _alpn(content: _Reader) -> tuple[str, ...]:
    protocols = content.vector(2)
    offered: list[str] = []
    while not protocols.done:
        offered.append(bytes(protocols.vector(1).data).decode("ascii", "replace"))
    return tuple(offered)


def unrecognized_name_alert() -> bytes:
    """A fatal unrecognized_name(112) alert record (RFC 6066 section 3, RFC 8446 section
    6.2) in the clear, as a server sends it before any key is agreed."""
    return bytes([21, 3, 3, 0, 2, 2, 112])
