"""A server tunnel's connection: TLS handshake under a deadline → who the peer is (its
certificate, a resumption judged as a full handshake would be) → the allow decision and
the per-identity cap → dial the target → relay. Every refusal happens before the target
is dialled, and before the client has seen anything that looks like acceptance."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass

import trio

from tunnel import postgres
from tunnel.connection import Connection
from tunnel.identity import decide, identity_from_der
from tunnel.outcomes import HANDSHAKE_TIMEOUT, NO_CERTIFICATE, Outcome, during_handshake, handshake_failure
from tunnel.pipeline import Host, dial_target, refuse, relay_and_close, send_before_relay
from tunnel.postgres import negotiate_as_server
from tunnel.proxy_protocol import v2_header
from tunnel.state import TunnelState
from tunnel.streams import PlainStream, StreamBroken, TLSStream


@dataclass(frozen=True)
class Preread:
    """What was read of a connection before its tunnel took it (tunnel/router.py, which
    picks a tunnel by SNI): `data`, the start of the client's TLS, fed to TLS first;
    `direct`, for protocol postgres: TLS began without an SSLRequest (so ALPN is required)."""

    data: bytes = b""
    direct: bool = False


async def serve_tls_client(
    host: Host, state: TunnelState, sock: socket.socket, conn: Connection, preread: Preread | None = None
) -> None:
    """Server mode: (PostgreSQL's negotiation,) handshake, decide, dial, relay. `state` is
    the one in force when the connection was accepted; the new one decides too if a reload
    came meanwhile. `preread`: the connection was routed here with its TLS begun."""
    config = state.config
    started = trio.current_time()
    client: TLSStream | None = None
    try:
        # A bare cancel scope: trio.fail_after costs two context managers per connection.
        with trio.CancelScope(deadline=started + config.limits.handshake_timeout) as deadline:
            if preread is None and config.protocol == "postgres":
                plain = PlainStream(sock)
                negotiation = await negotiate_as_server(plain)
                if negotiation.refused is not None:
                    await refuse_in_plaintext(host, conn, plain, negotiation.refused, negotiation.reply)
                    return
                preread = Preread(negotiation.prefix, negotiation.direct)
            client = TLSStream(sock, state.context, server_side=True, received=preread.data if preread else b"")
            # Held: the tickets (TLS 1.3) or Finished (TLS 1.2) go out only once the
            # peer is admitted below, so a refused client never sees an acceptance.
            await client.do_handshake(hold_last_flight=True)
        if deadline.cancelled_caught:
            refuse(host, conn, client or PlainStream(sock), HANDSHAKE_TIMEOUT)
            return
    except ssl.SSLError as exc:
        host.story.refused(conn, handshake_failure(exc))
        # The alert has been sent: close with a FIN, not a reset, so a client that
        # writes before it reads still finds the alert waiting (TLS 1.3).
        (client or PlainStream(sock)).close()
        return
    except StreamBroken as exc:
        refuse(host, conn, client or PlainStream(sock), during_handshake(exc))
        return
    assert client is not None
    if (
        config.protocol == "postgres"
        and preread is not None
        and preread.direct
        and client.ssl.selected_alpn_protocol() != postgres.ALPN
    ):
        refuse(host, conn, client, postgres.NO_ALPN)
        return
    host.metrics.handshake_seconds(host.name, trio.current_time() - started)
    der = client.peer_certificate()
    if der is None:  # CERT_REQUIRED makes this unreachable; refuse rather than trust that
        refuse(host, conn, client, NO_CERTIFICATE)
        return
    conn.identity = identity_from_der(der)
    # OpenSSL checks certificates only in a full handshake, and a client that keeps
    # resuming (each resumption brings a new ticket) never has another one.
    why = state.check_peer(client)
    if why is not None:
        refuse(host, conn, client, why, conn.identity)
        return
    conn.peer_chain = state.resumption.peers.chain(der)
    assert config.allow is not None
    decision = decide(conn.identity, config.allow)
    if not decision.allowed:
        refuse(host, conn, client, decision.refusal, conn.identity)
        return
    now = host.state
    if now is not state:  # reloaded during the handshake: the new rules decide
        why = now.still_admits(conn.identity, conn.peer_chain, conn.credentials)
        if why is not None:
            refuse(host, conn, client, why, conn.identity)
            return
    if conn.ticket is not None:  # limits.per_identity_connections, before anything is sent
        why = host.gate.admitted(conn.ticket, conn.identity.describe())
        if why is not None:
            refuse(host, conn, client, why, conn.identity)
            return
    try:
        await client.send_held()
    except StreamBroken as exc:
        refuse(host, conn, client, during_handshake(exc), conn.identity)
        return
    dialled = await dial_target(host, config, conn, client)
    if dialled is None:
        return
    target_sock, target = dialled
    host.story.opened(conn, client.describe_tls(), target=str(target))
    target_stream = PlainStream(target_sock)
    if config.proxy_protocol == "v2" and not await send_before_relay(
        host, conn, client, target_stream, _proxy_header(sock, conn, client)
    ):
        return
    await relay_and_close(host, client, target_stream, conn, config.limits.idle_timeout)


async def refuse_in_plaintext(host: Host, conn: Connection, plain: PlainStream, why: Outcome, reply: bytes) -> None:
    """A client that did not ask for TLS: send it `reply` (say, PostgreSQL's ErrorResponse,
    which psql shows), then close with a FIN so that it reads the reply. Logged refused."""
    host.story.refused(conn, why)
    if reply:
        with contextlib.suppress(StreamBroken):
            await plain.send_all(reply)
            await plain.send_eof()
    plain.close()


def _proxy_header(sock: socket.socket, conn: Connection, client: TLSStream) -> bytes:
    """PROXY v2: the client's address, the address it connected to, TLS version and CN."""
    tcp = isinstance(conn.address, tuple)
    local = sock.getsockname() if tcp else None
    return v2_header(
        (conn.address[0], conn.address[1]) if tcp else None,
        (local[0], local[1]) if local else None,
        tls_version=client.version(),
        common_name=conn.identity.cn if conn.identity else None,
        cert_in_session=True,
    )
