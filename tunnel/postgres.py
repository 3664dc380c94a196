"""PostgreSQL's TLS negotiation (`protocol: postgres`): what is said before the TLS
handshake, and nothing after it.

A PostgreSQL client does not start TLS at once. It sends an 8-byte SSLRequest (or first
a GSSENCRequest) and waits for one byte: 'S' (go on with TLS) or 'N' (no). PostgreSQL 17
clients may also start TLS directly ("direct SSL negotiation"), with the ALPN protocol
`postgresql`. Source: the PostgreSQL documentation, "Frontend/Backend Protocol",
section "SSL Session Encryption" and "Message Formats" (SSLRequest, GSSENCRequest,
CancelRequest, StartupMessage, ErrorResponse); stunnel's `protocol = pgsql` does the
client's half.

The reading of the first bytes is pure (`opening`: bytes in, what they are out); the
two sides' exchanges (`negotiate_as_server`, `answer_plain_application`,
`request_tls`) read and write a stream.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, Protocol

from tunnel.outcomes import Outcome, refusal

ALPN = "postgresql"  # the ALPN protocol of direct TLS (PostgreSQL 17)
SSL_REQUEST_CODE = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST_CODE = 80877104  # 1234 << 16 | 5680
CANCEL_REQUEST_CODE = 80877102  # 1234 << 16 | 5678
SSL_REQUEST = struct.pack("!II", 8, SSL_REQUEST_CODE)
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of a TLS ClientHello record (RFC 8446 section 5.1)
MAX_STARTUP_LENGTH = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
MAX_ROUNDS = 3  # GSSENCRequest then SSLRequest is two; more is a client going round in circles

TLS_REQUIRED = "this server requires TLS with a client certificate"

NOT_POSTGRES = refusal("not PostgreSQL")
PLAINTEXT_STARTUP = refusal("no TLS", "(a PostgreSQL StartupMessage in plaintext)")
PLAINTEXT_CANCEL = refusal("no TLS", "(a PostgreSQL CancelRequest in plaintext)")
NO_ALPN = refusal("no ALPN", "(direct TLS without the ALPN protocol postgresql)")

Kind = Literal["ssl_request", "gssenc_request", "cancel_request", "startup", "direct_tls", "unknown"]


@dataclass(frozen=True)
class Opening:
    """What a client's first bytes are. `length`: the message's declared length in bytes
    (the whole message, the length field included), 0 for direct TLS."""

    kind: Kind
    length: int = 0


def opening(first: bytes) -> Opening | None:
    """What a PostgreSQL client's first bytes are: None while fewer than 8 bytes have come
    (and they are not the start of a TLS record: one byte tells that). A StartupMessage is
    protocol 3.x with a length from 8 to MAX_STARTUP_LENGTH; anything else is `unknown`."""
    if first and first[0] == TLS_HANDSHAKE_RECORD:
        return Opening("direct_tls")
    if len(first) < 8:
        return None
    length, code = struct.unpack_from("!II", first)
    if length == 8 and code == SSL_REQUEST_CODE:
        return Opening("ssl_request", 8)
    if length == 8 and code == GSSENC_REQUEST_CODE:
        return Opening("gssenc_request", 8)
    if length == 16 and code == CANCEL_REQUEST_CODE:
        return Opening("cancel_request", 16)
    if code >> 16 == 3 and 8 <= length <= MAX_STARTUP_LENGTH:
        return Opening("startup", length)
    return Opening("unknown", length)


def error_response(message: str, code: str = "28000") -> bytes:
    """A FATAL ErrorResponse ('E') with SQLSTATE `code` (28000:
    invalid_authorization_specification, what PostgreSQL sends for a connection its
    pg_hba.conf does not admit), as psql shows it: `FATAL:  MESSAGE`."""
    fields = b"".join(
        tag + value.encode("utf-8", "replace").replace(b"\0", b"?") + b"\0"
        for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", code), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!I", 4 + len(body)) + body


class Stream(Protocol):
    """The two calls the exchanges need (tunnel.streams.PlainStream)."""

    async def receive_some(self, max_bytes: int = ...) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...


async def _receive_up_to(stream: Stream, have: bytes, size: int) -> bytes:
    """`have` plus what comes until there are `size` bytes or the stream ends."""
    data = bytearray(have)
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


@dataclass(frozen=True)
class ServerNegotiation:
    """How a client reached TLS at a server tunnel: `prefix`, bytes of its TLS handshake
    already read (to be fed to TLS first); `direct`, whether it started TLS at once (then
    ALPN postgresql is required). Or, instead, `refused`: the client did not ask for TLS,
    and `reply` (an ErrorResponse, maybe empty) is what to send it before closing."""

    prefix: bytes = b""
    direct: bool = False
    refused: Outcome | None = None
    reply: bytes = b""


async def negotiate_as_server(stream: Stream, first: bytes = b"") -> ServerNegotiation:
    """A server tunnel's side, before the handshake: answer SSLRequest with 'S' and
    GSSENCRequest with 'N' (the client then asks for TLS), take a TLS ClientHello as direct
    TLS, and refuse anything in plaintext: a StartupMessage or CancelRequest (read whole, so
    that closing sends a FIN, not a reset, and the ErrorResponse is seen) with an
    ErrorResponse saying TLS is required. `first`: bytes already read. The caller bounds
    the time; StreamBroken from the stream passes through."""
    data = first
    for _ in range(MAX_ROUNDS):
        if not data:
            data = await stream.receive_some(8)
            if not data:
                return ServerNegotiation(refused=refusal("not PostgreSQL", "(closed before a request)"))
        seen = opening(data)
        if seen is None:
            data = await _receive_up_to(stream, data, 8)
            seen = opening(data)
            if seen is None:
                return ServerNegotiation(refused=refusal("not PostgreSQL", "(closed within its first 8 bytes)"))
        if seen.kind == "direct_tls":
            return ServerNegotiation(prefix=data, direct=True)
        if seen.kind == "ssl_request":
            await stream.send_all(b"S")
            return ServerNegotiation(prefix=data[8:])
        if seen.kind == "gssenc_request":
            await stream.send_all(b"N")
            data = data[8:]
            continue
        if seen.kind in ("startup", "cancel_request"):
            await _receive_up_to(stream, data, seen.length)
            why = PLAINTEXT_STARTUP if seen.kind == "startup" else PLAINTEXT_CANCEL
            return ServerNegotiation(refused=why, reply=error_response(TLS_REQUIRED))
        return ServerNegotiation(refused=NOT_POSTGRES)
    return ServerNegotiation(refused=refusal("not PostgreSQL", "(too many encryption requests)"))


async def answer_plain_application(stream: Stream) -> bytes:
    """A client tunnel's side towards the local application, which connects without TLS:
    answer its SSLRequest or GSSENCRequest with 'N' (libpq's sslmode=prefer then goes on in
    plaintext; the TLS is the tunnel's). Returns the bytes of its first real message read so
    far (a StartupMessage or CancelRequest, to be forwarded first), b"" if it closed.
    The caller bounds the time."""
    for _ in range(MAX_ROUNDS):
        data = await _receive_up_to(stream, b"", 8)
        seen = opening(data)
        if seen is not None and seen.kind in ("ssl_request", "gssenc_request"):
            await stream.send_all(b"N")
            continue
        return data
    return b""


async def request_tls(stream: Stream) -> Outcome | None:
    """A client tunnel's side towards the server: send SSLRequest and require 'S'. None
    when the server agreed; else why not (nothing is ever sent in plaintext after it)."""
    await stream.send_all(SSL_REQUEST)
    answer = await stream.receive_some(1)
    if answer == b"S":
        return None
    if answer == b"N":
        return refusal("no TLS at the server", "(it answered N to SSLRequest)")
    if answer == b"E":
        return refusal("no TLS at the server", "(it answered SSLRequest with an error)")
    if not answer:
        return refusal("no TLS at the server", "(it closed after SSLRequest)")
    return refusal("not PostgreSQL", f"(it answered SSLRequest with {answer!r})")
