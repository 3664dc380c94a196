"""One tunnel: bind, accept under the connection caps (tunnel/limits.py: global, per
source, per identity), handshake under a deadline, decide who the peer is, dial the
target (with failover), relay, and log each connection's story.

Server mode: TLS in, plaintext out. Client mode: plaintext in, TLS out. Both share this
code; only which side is TLS differs. The identity decision is made before the target is
dialled, so a refused or silent client never costs the target a connection.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import math
import os
import platform
import socket
import ssl
import stat
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from tunnel.config import Address, TunnelConfig, UnixSocket
from tunnel.identity import Identity, decide, identity_from_der, profile_refusal
from tunnel.limits import SHED_DISPLACED, Gate, ShedLog, Ticket, source_key
from tunnel.logs import event
from tunnel.metrics import Metrics, NoMetrics
from tunnel.proxy_protocol import v2_header
from tunnel.relay import RelayStats, relay
from tunnel.streams import PlainStream, StreamBroken, TLSStream, ssl_reason, ssl_words
from tunnel.tls import build_context
from tunnel.trust import Certificates, PeerRecords, Trust, check_certificates, load_certificates, load_trust

log = logging.getLogger("tunnel")

_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ids = itertools.count(1)


@dataclass(frozen=True)
class TunnelState:
    """Everything a connection needs, built and validated up front; swapped whole on reload."""

    config: TunnelConfig
    context: ssl.SSLContext
    trust: Trust
    certificates: Certificates  # the tunnel's own certificate and CA, as loaded
    warnings: tuple[str, ...] = ()
    # Client mode: the last TLS session per target, to resume instead of a full handshake.
    # Tied to `context`, so a reload (a new context) starts empty.
    sessions: dict[Address, ssl.SSLSession] = field(default_factory=dict, compare=False)
    # The verdicts of full handshakes, for the resumptions that skip one (see trust.py).
    peers: PeerRecords = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", PeerRecords(self.trust))

    @classmethod
    def build(cls, config: TunnelConfig) -> TunnelState:
        """Validate everything the config names (ConfigError on the first problem)."""
        context = build_context(config)
        certificates = load_certificates(config)
        warnings = check_certificates(config, certificates=certificates)
        return cls(
            config=config,
            context=context,
            trust=load_trust(config, certificates),
            certificates=certificates,
            warnings=tuple(warnings),
        )

    @property
    def expiries(self) -> list[tuple[Path, datetime]]:
        """(file, not-after) for the tunnel's certificate and CA file."""
        return self.certificates.expiries(self.config.tls)

    def still_admits(self, conn: Connection) -> str | None:
        """Why an open connection's peer is no longer acceptable under this state, or None:
        the unix peer's credentials against unix.allow_*, then the chain it presented,
        judged as a full handshake would judge it now (path to an anchor, revocation of
        every certificate on it, current CRLs), then the allow rules."""
        if conn.credentials is not None and self.config.unix.checks_peers:
            why = unix_peer_refusal(conn.credentials, self.config.unix)
            if why is not None:
                return f"no longer allowed ({why})"
        if conn.identity is None or not conn.peer_chain:
            return None
        why = self.trust.refusal(conn.peer_chain, datetime.now(UTC))
        if why is not None:
            return "its CA is no longer trusted" if why.startswith("unknown CA") else why
        if self.config.allow is not None:
            decision = decide(conn.identity, self.config.allow)
            if not decision.allowed:
                return f"no longer allowed ({decision.reason})"
        return None

    def check_peer(self, stream: TLSStream) -> str | None:
        """After a handshake, in both modes: refuse a certificate no peer may present
        (identity.profile_refusal: a CA, several CNs); then remember a full handshake's
        verdict, or judge a resumed one (which OpenSSL did not verify) as a full
        handshake would. Why to refuse, or None."""
        leaf = stream.peer_certificate()
        if leaf is None:
            return "no certificate"
        why = profile_refusal(identity_from_der(leaf))
        if why is not None:
            return why
        if stream.ssl.session_reused:
            return self.peers.resumption_refusal(leaf, datetime.now(UTC))
        self.peers.remember(stream.presented_chain(), stream.verified_chain())
        return None


class TargetUnavailable(Exception):
    """No target in the list accepted a connection in time."""


@dataclass
class Connection:
    """One accepted connection, as the daemon and status pages see it."""

    id: int
    peer: str
    since: float
    identity: Identity | None = None
    peer_chain: tuple[bytes, ...] = ()  # as the peer presented it, leaf first (DER)
    address: Any = None  # the peer's socket address as accept() returned it
    credentials: PeerCredentials | None = None  # a unix: listener's peer process (SO_PEERCRED)
    stats: RelayStats = field(default_factory=RelayStats)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed_logged: bool = False  # its end is logged and counted (closed, or target unavailable)
    ticket: Ticket | None = None  # its slots (tunnel/limits.py)


class Tunnel:
    """A listener and its connections. `state` may be replaced at any time (reload)."""

    def __init__(self, state: TunnelState, metrics: Metrics | None = None, *, reuse_port: bool = False) -> None:
        self.state = state
        self.name = state.config.name
        self.metrics: Metrics = metrics or NoMetrics()
        self.connections: dict[int, Connection] = {}
        self._closed_bytes = [0, 0]  # in, out: of connections that have ended
        self.listening = False
        self._gate = Gate(state.config.limits)  # who may take a slot (tunnel/limits.py)
        self._shed_log = ShedLog(self.name)
        self.accept_failing: str | None = None  # why accept(2) keeps failing (EMFILE...), until it works again
        self._stop_accepting = trio.CancelScope()
        self._connections_scope: trio.CancelScope | None = None
        self._listener: socket.socket | None = None
        self._drain = True
        self._drain_deadline = math.inf  # when the SIGTERM drain ends open connections
        self._aborted = False
        self._ending: set[trio.CancelScope] = set()  # connections ending cleanly (abort cuts them)
        self._bound = state.config.listen  # what the listener was bound to (listen may move)
        self._reuse_port = reuse_port

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes relayed so far (in = towards the target), ended and open connections alike."""
        bytes_in, bytes_out = self._closed_bytes
        for conn in self.connections.values():
            bytes_in += conn.stats.bytes_in
            bytes_out += conn.stats.bytes_out
        return bytes_in, bytes_out

    def bind(self) -> None:
        """Bind the listen address now (OSError naming the tunnel if it cannot)."""
        if self._listener is None:
            address = self.state.config.listen
            try:
                self._listener = bind_listener(address, reuse_port=self._reuse_port, unix=self.state.config.unix)
                self._bound = address
            except OSError as exc:
                raise OSError(
                    exc.errno, f"tunnel {self.name}: cannot listen on {address}: {exc.strerror or exc}"
                ) from exc

    # -- lifecycle -------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound address through task_status, accept until stopped, then
        drain open connections for at most limits.drain_timeout."""
        self.bind()
        listener = self._listener
        assert listener is not None
        try:
            async with trio.open_nursery() as connections:
                self._connections_scope = connections.cancel_scope
                with self._stop_accepting:
                    self.listening = True
                    task_status.started(listener.getsockname())
                    event(
                        logging.INFO,
                        "listening",
                        "listening tunnel=%s mode=%s listen=%s target=%s",
                        self.name,
                        self.state.config.mode,
                        _format_sockname(listener),
                        ",".join(str(t) for t in self.state.config.targets),
                        tunnel=self.name,
                    )
                    await self._accept_loop(listener, connections)
                self.listening = False
                _close_listener(listener, self._bound)
                if self.connections:
                    event(
                        logging.INFO,
                        "draining",
                        "draining tunnel=%s open=%d",
                        self.name,
                        len(self.connections),
                        tunnel=self.name,
                    )
                if self._drain:
                    connections.cancel_scope.deadline = trio.current_time() + self.state.config.limits.drain_timeout
                    self._drain_deadline = connections.cancel_scope.deadline
        finally:
            self.listening = False
            _close_listener(listener, self._bound)

    def set_unix_permissions(self, unix: UnixSocket) -> None:
        """Give a bound unix: listen socket file `unix.group` and `unix.mode` again (on
        reload; the socket stays bound). Nothing for a TCP listener. OSError if it cannot."""
        if self._listener is not None and self._bound.path is not None and self._listener.fileno() != -1:
            set_unix_permissions(self._bound.path, unix)

    def replace_state(self, state: TunnelState) -> None:
        """Use `state` for every new connection from now on (one assignment)."""
        self.state = state
        self._gate.set_limits(state.config.limits)

    def close_listener(self) -> None:
        """Give up a listener bound by `bind` that `serve` never ran on."""
        if self._listener is not None:
            _close_listener(self._listener, self._bound)
            self._listener = None

    def stop(self, *, drain: bool = True) -> None:
        """Stop accepting now. With drain, open connections get limits.drain_timeout to
        finish; without, they go on until they end by themselves (a rebind on reload)."""
        self._drain = drain
        if drain and self._stop_accepting.cancel_called and self._connections_scope is not None:
            # Already stopped accepting without a drain deadline (moved on reload): set one.
            self._connections_scope.deadline = min(
                self._connections_scope.deadline, trio.current_time() + self.state.config.limits.drain_timeout
            )
            self._drain_deadline = self._connections_scope.deadline
        self._stop_accepting.cancel()

    def revalidate(self) -> None:
        """Close open connections whose peer the current state no longer admits."""
        for conn in list(self.connections.values()):
            why = self.state.still_admits(conn)
            if why is not None:
                conn.stats.why = f"closed on reload: {why}"
                event(
                    logging.WARNING,
                    "closing",
                    "closing tunnel=%s peer=%s identity=%s: %s",
                    self.name,
                    conn.peer,
                    conn.identity.describe() if conn.identity else "-",
                    why,
                    tunnel=self.name,
                    peer=conn.peer,
                    identity=conn.identity.describe() if conn.identity else None,
                    reason=why,
                )
                conn.cancel_scope.cancel()

    def abort(self) -> None:
        """Stop accepting and close every open connection now (with a reset)."""
        self._aborted = True
        for scope in self._ending:
            scope.cancel()
        self._stop_accepting.cancel()
        if self._connections_scope is not None:
            self._connections_scope.cancel()

    # -- accepting -------------------------------------------------------------------

    @property
    def handshaking(self) -> int:
        """Connections in their TLS handshake now (holding one of limits.max_handshakes)."""
        return len(self._gate.handshakes)

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """Accept under the Gate's caps (see tunnel/limits.py): wait for room (the kernel's
        backlog holds new connections meanwhile), accept, then admit, reset at once (a
        source over its caps, a crowd's newcomer), or hold the socket until room."""
        tcp = listener.family != socket.AF_UNIX
        async with trio.open_nursery() as reporter:
            reporter.start_soon(self._shed_log.report_every_interval)
            while True:
                handshake = self.state.config.mode == "server"
                await self._gate.wait_for_room(handshake=handshake, displace=tcp)
                sock, address = await _accept(listener, self.name, self)
                try:
                    source = source_key(address) if tcp else None
                    while (ticket := self._gate.admit(source, trio.current_time(), handshake=handshake)) is None:
                        await self._gate.wait_for_room(handshake=handshake, displace=tcp)
                except BaseException:
                    sock.close()
                    raise
                if isinstance(ticket, str):
                    self._shed(sock, address, source, ticket)
                else:
                    nursery.start_soon(self._handle, sock, address, ticket)

    def _shed(self, sock: socket.socket, address: Any, source: str | None, reason: str) -> None:
        """Reset a new socket at once (SO_LINGER 0: no TIME_WAIT left behind); counted,
        logged summed."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        self.metrics.shed(self.name, reason)
        self._shed_log.record(reason, source, _format_peer(address), trio.current_time())

    async def _handle(self, sock: socket.socket, address: Any, ticket: Ticket) -> None:
        peer = _format_peer(address)
        conn = Connection(
            id=next(_ids),
            peer=peer,
            since=trio.current_time(),
            address=address,
            ticket=ticket,
            cancel_scope=ticket.cancel_scope,  # cancelled when displaced
        )
        state = self.state
        try:
            with conn.cancel_scope:
                self.connections[conn.id] = conn
                if sock.family == socket.AF_UNIX:
                    # Before anything else (no handshake, no dial): is this process allowed?
                    conn.credentials = peer_credentials(sock)
                    if state.config.unix.checks_peers:
                        why = unix_peer_refusal(conn.credentials, state.config.unix)
                        if why is not None:
                            self._refuse(conn, PlainStream(sock), why)
                            return
                if state.config.mode == "server":
                    await self._serve_tls_client(state, sock, conn)
                else:
                    await self._serve_plain_client(state, sock, conn)
            if ticket.displaced:  # counted and logged (summed) here, not once each
                self.metrics.shed(self.name, SHED_DISPLACED)
                self._shed_log.record(SHED_DISPLACED, ticket.source, peer, trio.current_time())
            elif conn.cancel_scope.cancelled_caught and not conn.closed_logged:
                # Cancelled before the relay could say (mid-handshake, dialling, PROXY header).
                conn.stats.why = conn.stats.why or "closed by the daemon"
                self._log_closed(conn)
        except Exception:
            log.exception(
                "error tunnel=%s peer=%s (connection dropped)",
                self.name,
                peer,
                extra={"event": "error", "fields": {"tunnel": self.name, "peer": peer}},
            )
        finally:
            self.connections.pop(conn.id, None)
            self._closed_bytes[0] += conn.stats.bytes_in
            self._closed_bytes[1] += conn.stats.bytes_out
            self._gate.release(ticket)
            sock.close()

    async def _serve_tls_client(self, state: TunnelState, sock: socket.socket, conn: Connection) -> None:
        """Server mode: handshake, decide, dial, relay."""
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
                self._refuse(conn, client, "handshake timeout")
                return
        except ssl.SSLError as exc:
            self._log_refused(conn, handshake_failure_reason(exc))
            # The alert has been sent: close with a FIN, not a reset, so a client that
            # writes before it reads still finds the alert waiting (TLS 1.3).
            client.close()
            return
        except StreamBroken as exc:
            self._refuse(conn, client, f"during handshake: {exc}")
            return
        self.metrics.handshake_seconds(self.name, trio.current_time() - started)
        der = client.peer_certificate()
        if der is None:  # CERT_REQUIRED makes this unreachable; refuse rather than trust that
            self._refuse(conn, client, "no certificate")
            return
        conn.identity = identity_from_der(der)
        # OpenSSL checks certificates only in a full handshake, and a client that keeps
        # resuming (each resumption brings a new ticket) never has another one.
        why = state.check_peer(client)
        if why is not None:
            self._refuse(conn, client, why, conn.identity)
            return
        conn.peer_chain = state.peers.chain(der)
        assert config.allow is not None
        decision = decide(conn.identity, config.allow)
        if not decision.allowed:
            self._refuse(conn, client, decision.reason, conn.identity)
            return
        if self.state is not state:  # reloaded during the handshake: the new rules decide
            why = self.state.still_admits(conn)
            if why is not None:
                self._refuse(conn, client, why, conn.identity)
                return
        if conn.ticket is not None:  # limits.per_identity_connections, before anything is sent
            why = self._gate.admitted(conn.ticket, conn.identity.describe())
            if why is not None:
                self._refuse(conn, client, why, conn.identity)
                return
        try:
            await client.send_held()
        except StreamBroken as exc:
            self._refuse(conn, client, f"during handshake: {exc}", conn.identity)
            return
        dialled = await self._dial(config, conn, client)
        if dialled is None:
            return
        target_sock, target = dialled
        self._log_opened(conn, client.describe_tls(), target=str(target))
        target_stream = PlainStream(target_sock)
        if config.proxy_protocol == "v2":
            try:
                await target_stream.send_all(_proxy_header(sock, conn, client))
            except StreamBroken as exc:
                conn.stats.why = f"target: {exc}"
                client.abort()
                target_stream.abort()
                self._log_closed(conn)
                return
        await self._relay(client, target_stream, conn)

    async def _serve_plain_client(self, state: TunnelState, sock: socket.socket, conn: Connection) -> None:
        """Client mode: dial, handshake with the server, relay."""
        config = state.config
        client = PlainStream(sock)
        dialled = await self._dial(config, conn, client)
        if dialled is None:
            return
        target_sock, target = dialled
        try:
            server = TLSStream(
                target_sock,
                state.context,
                server_side=False,
                server_hostname=config.tls.server_name or target.host,
                session=state.sessions.get(target),
            )
        except BaseException:
            target_sock.close()
            raise
        started = trio.current_time()
        try:
            with trio.CancelScope(deadline=started + config.limits.handshake_timeout) as deadline:
                await server.do_handshake()
            reason = f"server {target}: handshake timeout" if deadline.cancelled_caught else None
        except ssl.SSLError as exc:
            alert = received_alert(exc)  # TLS 1.2: the server checks our certificate in the handshake
            reason = f"refused by server: {alert}" if alert else f"server {target}: {handshake_failure_reason(exc)}"
        except StreamBroken as exc:
            reason = f"server {target}: {exc}"
        except BaseException:
            server.abort()
            raise
        else:
            self.metrics.handshake_seconds(self.name, trio.current_time() - started)
            if reason is None and server.version() == "TLSv1.3" and not server.ssl.session_reused:
                reason = await self._server_verdict(server, started, deadline.deadline)
        if reason is not None:
            server.abort()
            # "refused by server: unknown ca" names the server apart; "server HOST:PORT: ..." has it.
            where = {"server": str(target)} if reason.startswith("refused by server") else {}
            self._refuse(conn, client, reason, None, **where)
            return
        der = server.peer_certificate()
        conn.identity = identity_from_der(der) if der else None
        why = state.check_peer(server)
        if why is not None:
            server.abort()
            self._refuse(conn, client, f"server {target}: {why}", conn.identity)
            return
        conn.peer_chain = state.peers.chain(der) if der else ()
        self._log_opened(conn, server.describe_tls(), server=str(target))
        try:
            await self._relay(client, server, conn)
        finally:
            # TLS 1.3 tickets arrive after the handshake: by now they have been read.
            if server.ssl.session is not None and conn.stats.why == "both sides closed":
                state.sessions[target] = server.ssl.session

    async def _server_verdict(self, server: TLSStream, started: float, deadline: float) -> str | None:
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
        Returns the refusal reason for the log, or None when accepted."""
        wait = max(0.1, 2 * (trio.current_time() - started))
        try:
            with trio.move_on_at(min(deadline, trio.current_time() + wait)):
                if not await server.await_first_record():
                    return "refused by server: closed after the handshake"
        except ssl.SSLError as exc:
            return f"refused by server: {received_alert(exc) or ssl_words(exc)}"
        except StreamBroken as exc:
            return f"refused by server: {exc}"
        return None

    async def _relay(
        self, accepted: PlainStream | TLSStream, dialled: PlainStream | TLSStream, conn: Connection
    ) -> None:
        try:
            await relay(
                accepted,
                dialled,
                idle_timeout=self.state.config.limits.idle_timeout,
                stats=conn.stats,
            )
        finally:
            if not conn.stats.why and self._drain_deadline <= trio.current_time() and not self._aborted:
                conn.stats.why = "drain timeout"
            if conn.stats.why == "both sides closed":
                accepted.close()
                dialled.close()
            elif conn.stats.why.startswith("idle for") or conn.stats.why == "drain timeout":
                await self._end_cleanly(accepted, dialled)
            else:
                # A broken side, a reload that no longer admits the peer, an abort: a
                # reset, so that neither end can take it for a normal end.
                accepted.abort()
                dialled.abort()
            if not conn.stats.why:
                conn.stats.why = "closed by the daemon"
            self._log_closed(conn)

    async def _end_cleanly(self, *streams: PlainStream | TLSStream) -> None:
        """End both sides as a normal end of stream (an idle timeout or the SIGTERM drain
        deadline: ends the daemon decides on, not failures): a FIN on a plain side, a TLS
        close_notify then a FIN on a TLS side, as a peer closing would; see Stream.end.
        For the drain deadline this runs in an already cancelled scope, hence the shield;
        `abort` (a second signal) cuts it short, and each side gets at most a second
        (a peer that reads nothing can hold up a close_notify), then a reset."""
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 1) as scope:
            self._ending.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    for stream in streams:
                        nursery.start_soon(stream.end)
            finally:
                self._ending.discard(scope)
        for stream in streams:
            stream.abort()  # a no-op for a side that has ended

    async def _dial(
        self, config: TunnelConfig, conn: Connection, client: PlainStream | TLSStream
    ) -> tuple[socket.socket, Address] | None:
        """A connection to the first target that answers; None (logged, client closed) if none."""
        started = trio.current_time()
        try:
            result = await dial_any(config.targets, config.limits.connect_timeout)
        except TargetUnavailable as exc:
            self._log_target_down(conn, str(exc))
            client.abort()
            return None
        self.metrics.connect_seconds(self.name, trio.current_time() - started)
        return result

    # -- the story of each connection, for the log and the counters ----------------------

    def _log_opened(self, conn: Connection, tls: str, **where: str) -> None:
        self.metrics.opened(self.name)
        identity = conn.identity.describe() if conn.identity else "-"
        place = " ".join(f"{key}={value}" for key, value in where.items())
        event(
            logging.INFO,
            "opened",
            "opened tunnel=%s peer=%s identity=%s tls=%s %s",
            self.name,
            conn.peer,
            identity,
            tls,
            place,
            tunnel=self.name,
            peer=conn.peer,
            identity=identity,
            tls=tls,
            **where,
        )

    def _refuse(
        self,
        conn: Connection,
        stream: PlainStream | TLSStream,
        reason: str,
        identity: Identity | None = None,
        **where: str,
    ) -> None:
        """Log the refusal and close with a reset, so the peer cannot take it for a normal end."""
        self._log_refused(conn, reason, identity, **where)
        stream.abort()

    def _log_refused(self, conn: Connection, reason: str, identity: Identity | None = None, **where: str) -> None:
        self.metrics.refused(self.name, reason)
        who = f" identity={identity.describe()}" if identity else ""
        place = "".join(f" {key}={value}" for key, value in where.items())
        event(
            logging.WARNING,
            "refused",
            "refused: %s tunnel=%s peer=%s%s%s",
            reason,
            self.name,
            conn.peer,
            who,
            place,
            tunnel=self.name,
            peer=conn.peer,
            identity=identity.describe() if identity else None,
            reason=reason,
            **where,
        )

    def _log_target_down(self, conn: Connection, why: str) -> None:
        conn.closed_logged = True
        conn.stats.why = f"target unavailable: {why}"
        self.metrics.closed(self.name, conn.stats.why)
        event(
            logging.ERROR,
            "target_unavailable",
            "target unavailable tunnel=%s peer=%s: %s",
            self.name,
            conn.peer,
            why,
            tunnel=self.name,
            peer=conn.peer,
            identity=conn.identity.describe() if conn.identity else None,
            reason=why,
        )

    def _log_closed(self, conn: Connection) -> None:
        conn.closed_logged = True
        stats = conn.stats
        self.metrics.closed(self.name, stats.why)
        identity = conn.identity.describe() if conn.identity else "-"
        duration = trio.current_time() - conn.since
        event(
            logging.INFO,
            "closed",
            "closed tunnel=%s peer=%s identity=%s in=%d out=%d duration=%.3fs why=%s%s",
            self.name,
            conn.peer,
            identity,
            stats.bytes_in,
            stats.bytes_out,
            duration,
            stats.why,
            " (unclean close: no TLS close_notify)" if stats.unclean else "",
            tunnel=self.name,
            peer=conn.peer,
            identity=identity,
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            duration=round(duration, 3),
            reason=stats.why,
            unclean=stats.unclean,
        )


# -- sockets ---------------------------------------------------------------------------


def bind_listener(address: Address, *, reuse_port: bool = False, unix: UnixSocket | None = None) -> socket.socket:
    """A listening, non-blocking socket for a listen address (OSError if it cannot bind).
    With reuse_port, several worker processes each bind the same TCP port (SO_REUSEPORT)
    and the kernel spreads new connections across them. A unix: socket file gets
    `unix.group` and `unix.mode` (default: the daemon's group, 0600) before it listens."""
    if address.path is not None:
        _remove_stale_unix_socket(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The socket file must never be more open than unix.mode, not even for a moment:
            # bind(2) creates it with 0777 & ~umask (unix(7)), and fchmod on the socket does
            # not reach the file. So bind under a umask that leaves 0600 at most, then chown
            # to unix.group, and only then chmod to unix.mode. The umask is per process, not
            # per thread: this is one system call on the trio thread, the only other threads
            # (getaddrinfo workers) create no files, and it can only ever narrow a mode.
            old_umask = os.umask(0o177)
            try:
                sock.bind(address.path)
            finally:
                os.umask(old_umask)
            try:
                set_unix_permissions(address.path, unix or UnixSocket())
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(address.path)
                raise
        except OSError:
            sock.close()
            raise
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address.host, address.port))
        except OSError:
            sock.close()
            raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def set_unix_permissions(path: str, unix: UnixSocket) -> None:
    """Give the socket file the group unix.group (None: the daemon's effective group), then
    the mode unix.mode: in that order, so the mode never opens it to the wrong group.
    chown(2) only where the group differs: a socket bound by a daemon whose own group is
    unix.group already has it, and the systemd unit's system call filter forbids chown.
    OSError naming the key if either fails (chown: only root, or a member of the group)."""
    gid = os.getegid() if unix.group is None else unix.group
    try:
        if os.stat(path).st_gid != gid:
            os.chown(path, -1, gid)
    except OSError as exc:
        hint = (
            " (only root or a member of the group may; under systemd/tunnel@.service, which filters"
            " out chown, make it the service's Group= instead)"
            if exc.errno == errno.EPERM
            else ""
        )
        raise OSError(exc.errno, f"unix.group: cannot give {path} group {gid}: {exc.strerror}{hint}") from exc
    try:
        os.chmod(path, unix.mode)
    except OSError as exc:
        raise OSError(exc.errno, f"unix.mode: cannot chmod {path} to {unix.mode:04o}: {exc.strerror}") from exc


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a unix socket, as the kernel recorded it at connect(2)."""

    pid: int
    uid: int
    gid: int  # effective gid
    groups: tuple[int, ...] | None  # supplementary gids; None where the kernel cannot say


# SO_PEERGROUPS (Linux 4.13+, socket(7)): the peer's supplementary groups at connect(2).
# Python does not name it. 59 is its number in asm-generic/socket.h, which these use;
# alpha, mips, parisc and sparc number it otherwise and go without (primary gid only).
_SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", None)
if _SO_PEERGROUPS is None and sys.platform == "linux":
    machine = platform.machine()
    if machine in {"x86_64", "aarch64", "riscv64", "s390x", "ppc64le", "ppc64", "loongarch64"} or (
        machine.startswith(("arm", "i386", "i486", "i586", "i686"))
    ):
        _SO_PEERGROUPS = 59


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED (struct ucred: pid, uid, gid; socket(7), unix(7)) of an accepted unix
    socket, and its SO_PEERGROUPS. At most 256 supplementary groups are read (Python's
    getsockopt buffer limit); past that, or on an older kernel, `groups` is None."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    groups: tuple[int, ...] | None = None
    if _SO_PEERGROUPS is not None:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        except OSError:  # ERANGE: more than 256 groups; ENOPROTOOPT: before Linux 4.13
            pass
        else:
            groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return PeerCredentials(pid=pid, uid=uid & 0xFFFFFFFF, gid=gid & 0xFFFFFFFF, groups=groups)


def unix_peer_refusal(peer: PeerCredentials, unix: UnixSocket) -> str | None:
    """Why `unix.allow_users` / `unix.allow_groups` refuse this peer process, or None if
    one of them admits it (any one match admits). A group matches the peer's effective gid
    or one of its supplementary groups: the process's own credentials, as the kernel checks
    file permissions, not the user database."""
    if unix.allow_users is not None and peer.uid in unix.allow_users:
        return None
    if unix.allow_groups is not None and (
        peer.gid in unix.allow_groups or not unix.allow_groups.isdisjoint(peer.groups or ())
    ):
        return None
    if unix.allow_users is None:
        where = "is not in unix.allow_groups"
    elif unix.allow_groups is None:
        where = "is not in unix.allow_users"
    else:
        where = "is in neither unix.allow_users nor unix.allow_groups"
    return f"unix peer not allowed: uid {peer.uid} gid {peer.gid} pid {peer.pid} {where}"


def _remove_stale_unix_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full accept queue: EAGAIN now, not a wait for room
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left over from a previous run
    except OSError as exc:
        # EACCES (a mode that shuts us out), EAGAIN (a full accept queue): someone may be
        # listening. Never unlink a socket that might be alive.
        raise OSError(exc.errno, f"{path} exists and may be in use: {exc.strerror}") from exc
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
    finally:
        probe.close()


def _close_listener(sock: socket.socket, address: Address) -> None:
    if sock.fileno() == -1:
        return
    trio.lowlevel.notify_closing(sock)
    sock.close()
    if address.path is not None:
        with contextlib.suppress(OSError):
            os.unlink(address.path)


async def _accept(listener: socket.socket, name: str, tunnel: Tunnel | None = None) -> tuple[socket.socket, Any]:
    """The next connection. Out of file descriptors or memory: log (not on every retry),
    wait 100 ms and try again; the connection waits in the kernel backlog meanwhile.
    `tunnel.accept_failing` says why while that lasts (for /healthz)."""
    failures = 0
    while True:
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            if tunnel is not None:  # it got as far as an empty queue: descriptors are back
                tunnel.accept_failing = None
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno in _ACCEPT_RETRY_ERRNOS:
                if failures % 50 == 0:
                    event(
                        logging.ERROR,
                        "accept_failed",
                        "accept failed tunnel=%s: %s; retrying every 100ms",
                        name,
                        exc.strerror,
                        tunnel=name,
                        reason=exc.strerror,
                    )
                failures += 1
                if tunnel is not None:
                    tunnel.accept_failing = exc.strerror or str(exc)
                await trio.sleep(0.1)
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue
            raise
        if failures:
            if tunnel is not None:
                tunnel.accept_failing = None
            event(
                logging.WARNING,
                "accept_recovered",
                "accept recovered tunnel=%s after %d retries",
                name,
                failures,
                tunnel=name,
            )
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # already reset by the peer: the handshake will tell
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await trio.lowlevel.checkpoint()  # a flood of connections must not starve the rest
        except BaseException:
            sock.close()
            raise
        return sock, address


async def dial_any(targets: tuple[Address, ...], seconds_each: float) -> tuple[socket.socket, Address]:
    """Connect to the first target that answers, in order; TargetUnavailable if none does.
    Each target gets `seconds_each` seconds, for all of its addresses together."""
    problems = []
    for target in targets:
        try:
            return await dial(target, trio.current_time() + seconds_each), target
        except OSError as exc:
            problems.append(f"{target}: {exc.strerror or exc}")
    raise TargetUnavailable("; ".join(problems))


# RFC 8305 section 5: start the next address this long after the previous attempt if it
# has not failed or succeeded by then (its recommended default).
CONNECTION_ATTEMPT_DELAY = 0.25

SockAddr = tuple[socket.AddressFamily, Any]


async def dial(target: Address, deadline: float = math.inf) -> socket.socket:
    """Open a non-blocking connection to one target by `deadline` (trio time).

    A unix path or an IP literal is one address. A host name is resolved on every dial
    (so DNS changes are followed), and every address it resolves to is tried, in the
    order `interleave` gives, "Happy Eyeballs" style (RFC 8305 sections 4-5): the next
    attempt starts as soon as the previous one fails, or after 250 ms while it is still
    pending; the first to connect wins and the others are closed.

    Raises TimeoutError ("connect timeout") when nothing connected by the deadline, or an
    OSError naming, for a name with several addresses, each address and its failure
    (`[::1]:5432: Connection refused; 127.0.0.1:5432: connect timeout`)."""
    if target.path is not None:
        return await _connect(socket.AF_UNIX, target.path, deadline)
    resolved = _numeric_address(target.host, target.port)
    if resolved is not None:
        return await _connect(resolved[0], resolved[1], deadline)
    infos = None
    with trio.move_on_at(deadline):
        infos = await trio.socket.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    if infos is None:
        raise TimeoutError(errno.ETIMEDOUT, "connect timeout")
    addresses = interleave(infos)
    if not addresses:
        raise OSError(errno.EHOSTUNREACH, f"no address for {target.host}")
    if len(addresses) == 1:
        return await _connect(addresses[0][0], addresses[0][1], deadline)
    return await _connect_first(addresses, deadline)


def interleave(infos: Sequence[tuple[Any, ...]]) -> list[SockAddr]:
    """getaddrinfo results as (family, sockaddr) in the order to try them, RFC 8305
    section 4: the family of the first result first, then alternate families, each
    family's addresses in their own order. Repeated addresses are tried once."""
    by_family: dict[Any, list[SockAddr]] = {}
    seen = set()
    for info in infos:
        family, sockaddr = info[0], info[4]
        if (family, sockaddr) not in seen:
            seen.add((family, sockaddr))
            by_family.setdefault(family, []).append((family, sockaddr))
    queues = list(by_family.values())  # dicts keep insertion order: the first family first
    ordered: list[SockAddr] = []
    while queues:
        ordered.extend(queue.pop(0) for queue in queues)
        queues = [queue for queue in queues if queue]
    return ordered


async def _connect_first(addresses: list[SockAddr], deadline: float) -> socket.socket:
    """Race connection attempts to `addresses` (RFC 8305 section 5); the first to connect."""
    winner: socket.socket | None = None
    failures: dict[int, OSError] = {}

    async def attempt(index: int, family: socket.AddressFamily, sockaddr: Any, failed: trio.Event) -> None:
        nonlocal winner
        try:
            sock = await _connect(family, sockaddr, deadline)
        except OSError as exc:
            failures[index] = exc
            failed.set()
            return
        if winner is None:
            winner = sock
            nursery.cancel_scope.cancel()
        else:  # connected in the same instant as another: not needed
            sock.close()

    try:
        async with trio.open_nursery() as nursery:
            for index, (family, sockaddr) in enumerate(addresses):
                if trio.current_time() >= deadline:
                    break
                failed = trio.Event()
                nursery.start_soon(attempt, index, family, sockaddr, failed)
                with trio.move_on_after(CONNECTION_ATTEMPT_DELAY):
                    await failed.wait()
    except BaseException:
        if winner is not None:
            winner.close()
        raise
    if winner is not None:
        return winner
    problems = [f"{_format_peer(addresses[i][1])}: {failures[i].strerror or failures[i]}" for i in sorted(failures)]
    if len(failures) < len(addresses):
        problems.append(f"{len(addresses) - len(failures)} more not tried before the deadline")
    if all(isinstance(exc, TimeoutError) for exc in failures.values()):
        raise TimeoutError(errno.ETIMEDOUT, "; ".join(problems))
    first = failures[min(failures)]
    raise OSError(first.errno, "; ".join(problems))


async def _connect(family: socket.AddressFamily, sockaddr: Any, deadline: float) -> socket.socket:
    """A connected non-blocking socket to one address; TimeoutError ("connect timeout")
    past `deadline`. A deadline costs a cancel scope only where there is a wait: a local
    target has usually accepted before connect() returns."""
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        try:
            sock.connect(sockaddr)
        except BlockingIOError as exc:
            if exc.errno != errno.EINPROGRESS:
                # EAGAIN is a refusal, not a connection in progress: a unix socket whose
                # accept queue is full, or no local port left. Waiting would hand back a
                # socket that never connected.
                why = "its accept queue is full" if family == socket.AF_UNIX else "no local port is free"
                raise OSError(exc.errno, why) from None
            # A local target has often accepted by now: ask again before waiting.
            error = sock.connect_ex(sockaddr)
            if error not in (0, errno.EISCONN):
                if error not in (errno.EINPROGRESS, errno.EALREADY):
                    raise OSError(error, os.strerror(error)) from None
                with trio.move_on_at(deadline) as waiting:
                    await trio.lowlevel.wait_writable(sock)
                if waiting.cancelled_caught:
                    raise TimeoutError(errno.ETIMEDOUT, "connect timeout") from None
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
                sock.getpeername()  # ENOTCONN (an OSError) if it did not connect after all
    except BaseException:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        raise
    return sock


@functools.lru_cache(maxsize=256)
def _numeric_address(host: str, port: int) -> tuple[socket.AddressFamily, Any] | None:
    """(family, sockaddr) for an IP address literal, worked out once; None for a name."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        return None
    return infos[0][0], infos[0][4]


# -- logging ---------------------------------------------------------------------------

_VERIFY_REASONS = {
    2: "unknown CA",
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown CA (self-signed certificate)",
    19: "unknown CA (self-signed certificate in chain)",
    20: "unknown CA",
    21: "unknown CA",
    23: "revoked",
    3: "CRL unavailable",
    11: "CRL not yet valid",
    12: "CRL expired",
    26: "certificate not valid for this purpose",
    62: "hostname mismatch",
    64: "IP address mismatch",
}

_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no certificate",
    "WRONG_VERSION_NUMBER": "not a TLS handshake",
    "HTTP_REQUEST": "not a TLS handshake (HTTP request)",
    "UNEXPECTED_MESSAGE": "not a TLS handshake",
    "PACKET_LENGTH_TOO_LONG": "not a TLS handshake",
    "UNSUPPORTED_PROTOCOL": "TLS version too old",
    "TLSV1_ALERT_PROTOCOL_VERSION": "TLS version too old",
    "NO_SHARED_CIPHER": "no shared cipher",
    # TLS 1.3: none of the peer's groups is one of tls.GROUPS (ffdhe8192 only, say).
    "NO_SUITABLE_KEY_SHARE": "no shared key exchange group",
    "NO_SHARED_GROUPS": "no shared key exchange group",
    # A handshake message longer than OpenSSL allows it: in practice the peer's
    # certificate list past tls.MAX_CERT_LIST (the other messages' bounds are far beyond
    # anything a peer sends, a ClientHello's is 128 KiB).
    "EXCESSIVE_MESSAGE_SIZE": "certificate list too long",
    "NO_PROTOCOLS_AVAILABLE": "TLS version too old",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the peer says our certificate is revoked",
    "UNEXPECTED_EOF_WHILE_READING": "closed during the handshake",
}


def handshake_failure_reason(exc: ssl.SSLError) -> str:
    """A short, stable reason for a failed handshake, for the refused: log line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return _VERIFY_REASONS.get(code, f"certificate rejected: {exc.verify_message}")
    if isinstance(exc, ssl.SSLEOFError):
        return "closed during the handshake"
    reason = str(exc.reason or "")
    if reason in _SSL_REASONS:
        return _SSL_REASONS[reason]
    return ssl_reason(exc)


def received_alert(exc: ssl.SSLError) -> str | None:
    """The TLS alert the peer sent, by its RFC 8446 section 6 name in words (`unknown ca`,
    `bad certificate`, `certificate required`), read from OpenSSL's reason code for a
    received alert (SSLV3_ALERT_*, TLSV1_ALERT_*, TLSV13_ALERT_*); None for any other
    failure (one found on our side)."""
    reason = str(exc.reason or "")
    for prefix in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_"):
        if reason.startswith(prefix):
            return reason.removeprefix(prefix).replace("_", " ").lower()
    return None


def _format_peer(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix" if not address else f"unix:{address}"


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


def _format_sockname(sock: socket.socket) -> str:
    return _format_peer(sock.getsockname())
