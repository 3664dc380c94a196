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

import contextlib
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from tunnel import client_hello
from tunnel.client_hello import unrecognized_name_alert
from tunnel.config import TunnelConfig, sni_matches
from tunnel.connection import Connection
from tunnel.outcomes import HANDSHAKE_TIMEOUT, Outcome, during_handshake, refusal
from tunnel.pipeline import Host, refuse
from tunnel.postgres import negotiate_as_server
from tunnel.server_side import Preread, refuse_in_plaintext
from tunnel.state import TunnelState
from tunnel.streams import PlainStream, StreamBroken

READ_SIZE = 4096


class Routed(Protocol):
    """A tunnel as the router sees it: its configuration now, and a way in."""

    name: str

    @property
    def config(self) -> TunnelConfig: ...

    async def take(self, sock: socket.socket, address: Any, preread: Preread) -> bool:
        """Serve a socket routed here (False: it takes none now; the caller keeps it)."""
        ...


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
    reader = client_hello.Reader()
    chunk = data
    while True:
        try:
            hello = reader.feed(chunk)
        except ValueError as exc:
            return Opening(refused=refusal("not TLS", f"({exc})"))
        if hello is not None:
            return Opening(bytes(reader.data), hello, ssl_request)
        if len(reader.data) > client_hello.MAX_CLIENT_HELLO + 4096:
            return Opening(refused=refusal("not TLS", "(a ClientHello too long)"))
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            return Opening(refused=refusal("not TLS", "(closed before its ClientHello ended)"))


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


async def route(
    host: Host, sock: socket.socket, conn: Connection, state: TunnelState, members: Sequence[Routed], where: str
) -> Preread | None:
    """A connection `host` accepted on the shared address `where`: read its opening under
    `state`'s handshake_timeout and pick the tunnel among `members` that its SNI names.
    Returns the opening as a Preread when that is `host` itself; None when it was refused
    (logged; an unknown name gets the unrecognized_name alert) or handed to another
    tunnel (then conn.handed_over, and the socket is that tunnel's)."""
    plain = PlainStream(sock)
    postgres_here = any(member.config.protocol == "postgres" for member in members)
    with trio.move_on_after(state.config.limits.handshake_timeout) as waited:
        try:
            opening = await read_opening(plain, postgres_here=postgres_here)
        except StreamBroken as exc:
            refuse(host, conn, plain, during_handshake(exc))
            return None
    if waited.cancelled_caught:
        refuse(host, conn, plain, HANDSHAKE_TIMEOUT)
        return None
    if opening.refused is not None:
        await refuse_in_plaintext(host, conn, plain, opening.refused, opening.reply)
        return None
    assert opening.hello is not None
    server_name = opening.hello.server_name
    chosen = pick(server_name, members)
    why = unknown_name(server_name, where) if chosen is None else mismatch(opening, chosen.config)
    if why is not None:
        host.story.refused(conn, why)
        with contextlib.suppress(StreamBroken), trio.move_on_after(1):
            await plain.send_all(unrecognized_name_alert())
        plain.close()
        return None
    assert chosen is not None
    preread = Preread(opening.data, direct=not opening.ssl_request)
    if chosen is host:  # type: ignore[comparison-overlap]  # the same tunnel, seen through two protocols
        return preread
    with trio.move_on_after(state.config.limits.handshake_timeout):
        conn.handed_over = await chosen.take(sock, conn.address, preread)
    if not conn.handed_over:
        refuse(host, conn, plain, refusal("no room", f"(tunnel {chosen.name} is at its limits or stopping)"))
    return None
