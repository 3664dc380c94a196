"""A server tunnel's connection: TLS handshake under a deadline → who the peer is (its
certificate, a resumption judged as a full handshake would be) → the allow decision and
the per-identity cap → dial the target → relay. Every refusal happens before the target
is dialled, and before the client has seen anything that looks like acceptance."""

from __future__ import annotations

import socket
import ssl

import trio

from tunnel.connection import Connection
from tunnel.identity import decide, identity_from_der
from tunnel.outcomes import HANDSHAKE_TIMEOUT, NO_CERTIFICATE, during_handshake, handshake_failure, side_broke
from tunnel.pipeline import Host, dial_target, refuse, relay_and_close
from tunnel.proxy_protocol import v2_header
from tunnel.state import TunnelState
from tunnel.streams import PlainStream, StreamBroken, TLSStream


async def serve_tls_client(host: Host, state: TunnelState, sock: socket.socket, conn: Connection) -> None:
    """Server mode: handshake, decide, dial, relay. `state` is the one in force when the
    connection was accepted; the new one decides too if a reload came meanwhile."""
    config = state.config
    client = TLSStream(sock, state.context, server_side=True)
    started = trio.current_time()
    try:
        # A bare cancel scope: trio.fail_after costs two context managers per connection.
        with trio.CancelScope(deadline=started + config.limits.handshake_timeout) as deadline:
            # Held: the tickets (TLS 1.3) or Finished (TLS 1.2) go out only once the
            # peer is admitted below, so a refused client never sees an acceptance.
            await client.do_handshake(hold_last_flight=True)
        if deadline.cancelled_caught:
            refuse(host, conn, client, HANDSHAKE_TIMEOUT)
            return
    except ssl.SSLError as exc:
        host.story.refused(conn, handshake_failure(exc))
        # The alert has been sent: close with a FIN, not a reset, so a client that
        # writes before it reads still finds the alert waiting (TLS 1.3).
        client.close()
        return
    except StreamBroken as exc:
        refuse(host, conn, client, during_handshake(exc))
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
    if config.proxy_protocol == "v2":
        try:
            await target_stream.send_all(_proxy_header(sock, conn, client))
        except StreamBroken as exc:
            conn.stats.end = side_broke("target", exc)
            client.abort()
            target_stream.abort()
            host.story.closed(conn)
            return
    await relay_and_close(host, client, target_stream, conn, config.limits.idle_timeout)


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
