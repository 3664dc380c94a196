"""A client tunnel's connection: (PostgreSQL's negotiation with the application, see
tunnel/postgres.py) → dial the target (and ask it for TLS, for protocol postgres) → TLS
handshake with our certificate under a deadline → the server's verdict on it (TLS 1.3 gives it after the handshake) →
who the server is (its certificate, a resumption judged as a full handshake would be) →
relay. A server's refusal is logged as one, never as a connection opened. A server that
fails a handshake resuming a session gets one more try with a full handshake, and no
session offered again if that works."""

from __future__ import annotations

import logging
import socket
import ssl

import trio

from tunnel import postgres
from tunnel.config import Address
from tunnel.connection import Connection
from tunnel.identity import identity_from_der
from tunnel.logs import event
from tunnel.outcomes import (
    BOTH_SIDES_CLOSED,
    HANDSHAKE_TIMEOUT,
    Outcome,
    handshake_failure,
    received_alert,
    refusal,
    refused_by_server,
    ssl_words,
)
from tunnel.pipeline import Host, dial_target, refuse, relay_and_close, send_before_relay
from tunnel.state import Resumption, TunnelState
from tunnel.streams import PlainStream, StreamBroken, TLSStream


async def serve_plain_client(host: Host, state: TunnelState, sock: socket.socket, conn: Connection) -> None:
    """Client mode: dial, handshake with the server, relay. A handshake that offered a
    session and failed is tried once more, on a new connection, with a full handshake
    (see `_resumption_refused`)."""
    config = state.config
    client = PlainStream(sock)
    first = b""  # protocol postgres: the application's first message, sent once TLS is up
    if config.protocol == "postgres":
        with trio.move_on_after(config.limits.handshake_timeout) as waited:
            try:
                first = await postgres.answer_plain_application(client)
            except StreamBroken as exc:
                refuse(host, conn, client, Outcome("client error", f"client: {exc}"))
                return
        if waited.cancelled_caught or not first:
            silence = "silent" if waited.cancelled_caught else "closed"
            refuse(host, conn, client, refusal("no startup message", f"(the application was {silence})"))
            return
    resumption = state.resumption
    attempt = await _handshake(host, state, conn, client, resume=True)
    if attempt is None:
        return
    server, target, reason, offered = attempt
    if reason is not None and offered and reason.label != HANDSHAKE_TIMEOUT.label:
        server.abort()
        resumption.sessions.pop(target, None)
        attempt = await _handshake(host, state, conn, client, resume=False)
        if attempt is None:
            return
        server, target, retried, _ = attempt
        if retried is None:
            _resumption_refused(host, resumption, target, reason)
        reason = retried
    where = f"server {target}"
    if reason is not None:
        server.abort()
        # "refused by server: unknown ca" names the server apart; "server HOST:PORT: ..." has it.
        place = {"server": str(target)} if reason.label == "refused by server" else {}
        refuse(host, conn, client, reason, None, **place)
        return
    der = server.peer_certificate()
    conn.identity = identity_from_der(der) if der else None
    why = state.check_peer(server)
    if why is not None:
        server.abort()
        refuse(host, conn, client, why.about(where), conn.identity)
        return
    conn.peer_chain = resumption.peers.chain(der) if der else ()
    host.story.opened(conn, server.describe_tls(), server=str(target))
    if first:
        if not await send_before_relay(host, conn, client, server, first):
            return
        conn.stats.bytes_in += len(first)
    try:
        await relay_and_close(host, client, server, conn, config.limits.idle_timeout)
    finally:
        # TLS 1.3 tickets arrive after the handshake: by now they have been read.
        if (
            server.ssl.session is not None
            and conn.stats.end is BOTH_SIDES_CLOSED
            and target not in resumption.not_resuming
        ):
            resumption.sessions[target] = server.ssl.session


async def _handshake(
    host: Host, state: TunnelState, conn: Connection, client: PlainStream, *, resume: bool
) -> tuple[TLSStream, Address, Outcome | None, bool] | None:
    """Dial a target and handshake with it, offering its last session if `resume` (and
    it has not refused one): (the TLS stream, the target, why the server is refused or
    None, whether a session was offered). None when no target answered (logged, and the
    client closed). The stream is open either way: the caller aborts a refused one."""
    config = state.config
    dialled = await dial_target(host, config, conn, client)
    if dialled is None:
        return None
    target_sock, target = dialled
    if config.protocol == "postgres":
        why: Outcome | None = None
        with trio.move_on_after(config.limits.handshake_timeout) as waited:
            try:
                why = await postgres.request_tls(PlainStream(target_sock))
            except StreamBroken as exc:
                why = Outcome("during handshake", f"after SSLRequest: {exc}")
        if waited.cancelled_caught:
            why = HANDSHAKE_TIMEOUT
        if why is not None:
            target_sock.close()
            refuse(host, conn, client, why.about(f"server {target}"))
            return None
    resumption = state.resumption
    session = resumption.sessions.get(target) if resume and target not in resumption.not_resuming else None
    try:
        server = TLSStream(
            target_sock,
            state.context,
            server_side=False,
            server_hostname=config.tls.server_name or target.host,
            session=session,
        )
    except BaseException:
        target_sock.close()
        raise
    where = f"server {target}"
    started = trio.current_time()
    reason: Outcome | None
    try:
        with trio.CancelScope(deadline=started + config.limits.handshake_timeout) as deadline:
            await server.do_handshake()
        reason = HANDSHAKE_TIMEOUT.about(where) if deadline.cancelled_caught else None
    except ssl.SSLError as exc:
        alert = received_alert(exc)  # TLS 1.2: the server checks our certificate in the handshake
        reason = refused_by_server(alert) if alert else handshake_failure(exc).about(where)
    except StreamBroken as exc:
        reason = Outcome("during handshake", str(exc)).about(where)  # a reset, say
    except BaseException:
        server.abort()
        raise
    else:
        host.metrics.handshake_seconds(host.name, trio.current_time() - started)
        if reason is None and server.version() == "TLSv1.3" and not server.ssl.session_reused:
            reason = await _server_verdict(server, started, deadline.deadline)
    return server, target, reason, session is not None


def _resumption_refused(host: Host, resumption: Resumption, target: Address, why: Outcome) -> None:
    """A server that failed a handshake offering a session, then completed a full one:
    it cannot resume (redis-server with `tls-session-caching no` sends session tickets,
    then, having no session ID context, fails every handshake that offers one with an
    `internal error` alert: OpenSSL's "session id context uninitialized",
    SSL_CTX_set_session_id_context(3)). No session is offered to it again until a reload
    (a new state); said once, as a warning."""
    resumption.not_resuming.add(target)
    event(
        logging.WARNING,
        "resumption_refused",
        "resumption refused tunnel=%s server=%s: %s; full handshakes with it from now on",
        host.name,
        target,
        why.text,
        tunnel=host.name,
        reason=why.text,
        server=str(target),
    )


async def _server_verdict(server: TLSStream, started: float, deadline: float) -> Outcome | None:
    """Client mode, after a full TLS 1.3 handshake: whether the server refused us.

    In TLS 1.3 our side of the handshake is complete before the server has checked
    our certificate; a server that refuses it sends its alert (unknown ca, bad
    certificate, certificate required, ...) after, and it would only surface as the
    connection's first read, after `opened` was logged and counted. So wait for the
    server's first record before saying `opened`: an alert is a refusal, and so is a
    reset or an end of stream before anything else; a session ticket (what a server
    that accepted us sends at once: OpenSSL, Go and this tunnel all do) or data (a
    MySQL greeting, relayed next) is an acceptance. A server that sends neither (no
    tickets, and a protocol where the client speaks first) is taken to accept once
    twice the handshake's duration (at least 100 ms) has passed without an alert:
    the alert would have come a round trip after our Finished, and the handshake
    took at least that round trip. The wait happens only for full handshakes: a
    resumed session carries no certificate to refuse, and client tunnels resume
    their sessions, so usually only the first connection to a target waits.
    Returns the refusal, or None when accepted."""
    wait = max(0.1, 2 * (trio.current_time() - started))
    try:
        with trio.move_on_at(min(deadline, trio.current_time() + wait)):
            if not await server.await_first_record():
                return refused_by_server("closed after the handshake")
    except ssl.SSLError as exc:
        return refused_by_server(received_alert(exc) or ssl_words(exc))
    except StreamBroken as exc:
        return refused_by_server(str(exc))
    return None
