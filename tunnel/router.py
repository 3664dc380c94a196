"""Several server tunnels on one listen address, each naming its server names (`sni`):
read the client's opening (PostgreSQL's SSLRequest first, where a tunnel on the address
speaks postgres; then the TLS ClientHello), and pick the tunnel its SNI names.

Which tunnel answers a name: the one naming it exactly or by `*.domain` (`tunnel check`
refuses names two tunnels both admit), else the one that says `*`, else none: the
client gets a fatal unrecognized_name alert (RFC 6066 section 3) and the refusal is
logged. The tunnel that accepted the socket reads the opening under its own caps and
handshake_timeout (tunnel/tunnel.py), then hands the socket on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tunnel import client_hello
from tunnel.config import TunnelConfig, sni_matches
from tunnel.outcomes import Outcome, refusal
from tunnel.postgres import negotiate_as_server
from tunnel.streams import PlainStream

READ_SIZE = 4096


class Routed(Protocol):
    """A tunnel as the router sees it: its configuration now."""

    @property
    def config(self) -> TunnelConfig: ...


T = TypeVar("T", bound=Routed)


def pick(server_name: str | None, tunnels: Iterable[T]) -> T | None:
    """The tunnel whose `sni` admits `server_name` (None: the client sent none): a name or
    `*.domain` first, the `*` fallback after."""
    fallback: T | None = None
    for tunnel in tunnels:
        for pattern in tunnel.config.sni:
            if pattern == "*":
                fallback = tunnel
            elif sni_matches(pattern, server_name):
                return tunnel
    return fallback


@dataclass(frozen=True)
class Opening:
    """A client's opening, read: `data`, the bytes of its TLS so far (the whole
    ClientHello), `hello` what that asks for, `ssl_request` whether PostgreSQL's
    SSLRequest came first (and was answered 'S'). Or `refused`, with a `reply` to send in
    plaintext before closing (PostgreSQL's ErrorResponse)."""

    data: bytes = b""
    hello: client_hello.ClientHello | None = None
    ssl_request: bool = False
    refused: Outcome | None = None
    reply: bytes = b""


async def read_opening(stream: PlainStream, *, postgres_here: bool) -> Opening:
    """Read up to the end of the client's ClientHello. With `postgres_here` (a tunnel on
    the address speaks postgres), a PostgreSQL client's SSLRequest is answered first, as
    tunnel/postgres.py does. The caller bounds the time; StreamBroken passes through."""
    data = b""
    ssl_request = False
    if postgres_here:
        negotiation = await negotiate_as_server(stream)
        if negotiation.refused is not None:
            return Opening(refused=negotiation.refused, reply=negotiation.reply)
        data, ssl_request = negotiation.prefix, not negotiation.direct
    while True:
        try:
            hello = client_hello.parse(data)
        except ValueError as exc:
            return Opening(refused=refusal("not TLS", f"({exc})"))
        if hello is not None:
            return Opening(data, hello, ssl_request)
        if len(data) > client_hello.MAX_CLIENT_HELLO + 4096:
            return Opening(refused=refusal("not TLS", "(a ClientHello too long)"))
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            return Opening(refused=refusal("not TLS", "(closed before its ClientHello ended)"))
        data += chunk


def mismatch(opening: Opening, config: TunnelConfig) -> Outcome | None:
    """Why the tunnel picked cannot take this opening: a PostgreSQL SSLRequest for a
    tunnel that does not speak postgres."""
    if opening.ssl_request and config.protocol != "postgres":
        return refusal("not PostgreSQL", f"(an SSLRequest for tunnel {config.name}, whose protocol is tcp)")
    return None


UNKNOWN_SERVER_NAME = "unknown server name"


def unknown_name(server_name: str | None, where: str) -> Outcome:
    named = f"SNI {server_name!r}" if server_name is not None else "no SNI"
    return refusal(UNKNOWN_SERVER_NAME, f"({named} on {where})")
