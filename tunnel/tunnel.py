"""One tunnel: its listener's life (bind, accept under the connection caps of
tunnel/limits.py, drain, stop), the registry of its open connections and their byte
totals, and re-judging them on reload. Each accepted connection lives in
(on an address tunnels share by SNI, after router.route picked its tunnel)
server_side.serve_tls_client or client_side.serve_plain_client; the listening socket
comes from tunnel/listener.py."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from tunnel.client_side import serve_plain_client
from tunnel.config import TunnelConfig, UnixSocket, format_sockaddr
from tunnel.connection import Connection, Story
from tunnel.limits import SHED_DISPLACED, Gate, ShedLog, Ticket, source_key
from tunnel.listener import Listeners, accept, set_unix_permissions
from tunnel.logs import event
from tunnel.metrics import Metrics, NoMetrics
from tunnel.outcomes import (
    CERTIFICATE_EXPIRED,
    CERTIFICATE_EXPIRED_END,
    CLOSED_BY_THE_DAEMON,
    closed_on_reload,
)
from tunnel.pipeline import Endings, refuse
from tunnel.router import route
from tunnel.server_side import Preread, serve_tls_client
from tunnel.state import TunnelState
from tunnel.streams import PlainStream
from tunnel.unix_peers import peer_credentials, unix_peer_refusal

log = logging.getLogger("tunnel")

EXPIRY_SWEEP = 1.0  # seconds between looks for connections whose peer's certificate expired


class Tunnel:
    """A listener and its connections. `state` may be replaced at any time (reload)."""

    def __init__(
        self, state: TunnelState, metrics: Metrics | None = None, *, listeners: Listeners | None = None
    ) -> None:
        """`listeners`: the process's registry of listening sockets, which this tunnel
        borrows its socket from (a registry of its own if none is given)."""
        self.state = state
        self.name = state.config.name
        self.metrics: Metrics = metrics or NoMetrics()
        self.connections: dict[int, Connection] = {}
        self._closed_bytes = [0, 0]  # in, out: of connections that have ended
        self.listening = False
        self.gate = Gate(state.config.limits)  # who may take a slot (tunnel/limits.py)
        self.story = Story(self.name, self.metrics, state.config.metrics)
        self.endings = Endings()
        self._shed_log = ShedLog(self.name)
        self.accept_failing: str | None = None  # why accept(2) keeps failing (EMFILE...), until it works again
        self._stop_accepting = trio.CancelScope()
        self._admitted = trio.Event()  # a socket that waited for room was admitted or shed
        self._connections_scope: trio.CancelScope | None = None
        self._connections: trio.Nursery | None = None  # where connections routed here run
        self._listener: socket.socket | None = None
        self._drain = True
        self._bound = state.config.listen  # what the listener was bound to (listen may move)
        self._listeners = listeners or Listeners()

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes relayed so far (in = towards the target), ended and open connections alike."""
        bytes_in, bytes_out = self._closed_bytes
        for conn in self.connections.values():
            bytes_in += conn.stats.bytes_in
            bytes_out += conn.stats.bytes_out
        return bytes_in, bytes_out

    @property
    def config(self) -> TunnelConfig:
        """The configuration in force now."""
        return self.state.config

    @property
    def expiries(self) -> list[tuple[Path, datetime]]:
        """(file, notAfter) of the certificates the tunnel uses now."""
        return self.state.expiries

    @property
    def crl_next_update(self) -> datetime | None:
        return self.state.trust.crl_next_update

    @property
    def max_connections(self) -> int:
        """limits.max_connections now."""
        return self.state.config.limits.max_connections

    def identity_bytes_open(self) -> list[tuple[str, int, int]]:
        """(identity label, bytes in, bytes out) of each open connection counted per
        identity (metrics.per_identity; see Story.opened)."""
        return [
            (conn.metrics_identity, conn.stats.bytes_in, conn.stats.bytes_out)
            for conn in self.connections.values()
            if conn.metrics_identity is not None
        ]

    def bind(self) -> None:
        """Bind the listen address now (OSError naming the tunnel if it cannot)."""
        if self._listener is None:
            address = self.state.config.listen
            try:
                self._listener = self._listeners.borrow(address, self.state.config.unix)
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
                self._connections = connections
                with self._stop_accepting:
                    self.listening = True
                    self._listeners.join(self._bound, self.name, self)
                    task_status.started(listener.getsockname())
                    event(
                        logging.INFO,
                        "listening",
                        "listening tunnel=%s mode=%s listen=%s target=%s",
                        self.name,
                        self.state.config.mode,
                        format_sockaddr(listener.getsockname()),
                        ",".join(str(t) for t in self.state.config.targets),
                        tunnel=self.name,
                    )
                    await self._accept_loop(listener, connections)
                self.listening = False
                self._give_back_listener()
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
                    self.endings.drain_deadline = connections.cancel_scope.deadline
        finally:
            self.listening = False
            self._give_back_listener()

    def set_unix_permissions(self, unix: UnixSocket) -> None:
        """Give a bound unix: listen socket file `unix.group` and `unix.mode` again (on
        reload; the socket stays bound). Nothing for a TCP listener, nor for a socket the
        process was handed (systemd's SocketMode= rules it). OSError if it cannot."""
        if self._listeners.adopted(self._bound):
            return
        if self._listener is not None and self._bound.path is not None and self._listener.fileno() != -1:
            set_unix_permissions(self._bound.path, unix)

    def replace_state(self, state: TunnelState) -> None:
        """Use `state` for every new connection from now on (one assignment)."""
        self.state = state
        self.gate.set_limits(state.config.limits)
        self.story.settings = state.config.metrics

    def close_listener(self) -> None:
        """Give up a listener bound by `bind` that `serve` never ran on."""
        self._give_back_listener()

    def _give_back_listener(self) -> None:
        """Return the socket to the registry (once), which closes it if nobody else holds it."""
        if self._listener is not None:
            self._listener = None
            self._listeners.leave(self._bound, self.name, self)
            self._listeners.give_back(self._bound)

    def stop(self, *, drain: bool = True) -> None:
        """Stop accepting now. With drain, open connections get limits.drain_timeout to
        finish; without, they go on until they end by themselves (a rebind on reload)."""
        self._drain = drain
        if drain and self._stop_accepting.cancel_called and self._connections_scope is not None:
            # Already stopped accepting without a drain deadline (moved on reload): set one.
            self._connections_scope.deadline = min(
                self._connections_scope.deadline, trio.current_time() + self.state.config.limits.drain_timeout
            )
            self.endings.drain_deadline = self._connections_scope.deadline
        self._stop_accepting.cancel()

    def revalidate(self) -> None:
        """Close open connections whose peer the current state no longer admits."""
        for conn in list(self.connections.values()):
            why = self.state.still_admits(conn.identity, conn.peer_chain, conn.credentials)
            if why is not None:
                conn.stats.end = closed_on_reload(why)
                self.story.closing(conn, why)
                conn.cancel_scope.cancel()

    async def _close_expired(self) -> None:
        """limits.close_on_expiry: a connection lasts no longer than the certificate that
        authorised it (its peer's, in either mode). Checked every EXPIRY_SWEEP seconds;
        closed with a reset and logged `closing ...: certificate expired`, as a revocation
        is. Runs while the tunnel accepts."""
        while True:
            await trio.sleep(EXPIRY_SWEEP)
            if not self.state.config.limits.close_on_expiry or not self.connections:
                continue
            now = datetime.now(UTC)
            for conn in list(self.connections.values()):
                if conn.identity is not None and conn.identity.not_after <= now and conn.stats.end is None:
                    conn.stats.end = CERTIFICATE_EXPIRED_END
                    self.story.closing(conn, CERTIFICATE_EXPIRED)
                    conn.cancel_scope.cancel()

    def abort(self) -> None:
        """Stop accepting and close every open connection now (with a reset)."""
        self.endings.abort()
        self._stop_accepting.cancel()
        if self._connections_scope is not None:
            self._connections_scope.cancel()

    # -- accepting -------------------------------------------------------------------

    @property
    def handshaking(self) -> int:
        """Connections in their TLS handshake now (holding one of limits.max_handshakes)."""
        return len(self.gate.handshakes)

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        """Accept under the Gate's caps (see tunnel/limits.py): wait for room (the kernel's
        backlog holds new connections meanwhile), accept, then admit, reset at once (a
        source over its caps, a crowd's newcomer), or hold the socket until room."""
        tcp = listener.family != socket.AF_UNIX
        async with trio.open_nursery() as reporter:
            reporter.start_soon(self._shed_log.report_every_interval)
            reporter.start_soon(self._close_expired)  # while accepting (a drain is bounded anyway)
            while True:
                handshake = self.state.config.mode == "server"
                await self.gate.wait_for_room(handshake=handshake, displace=tcp)
                async with self._listeners.accepting(self._bound):
                    sock, address = await accept(listener, self.name, self)
                # From here the socket is the client's connection: it is served, or drained,
                # never closed unread because the tunnel stops (the client would see a reset).
                source = source_key(address) if tcp else None
                ticket = self.gate.admit(source, trio.current_time(), handshake=handshake)
                if ticket is None:  # no room after all: wait for it in a task of its own,
                    # which a stop leaves to drain (the connections nursery outlives this loop)
                    nursery.start_soon(self._admit_then_handle, sock, address, source, handshake)
                    await self._admitted.wait()
                    self._admitted = trio.Event()
                elif isinstance(ticket, str):
                    self._shed(sock, address, source, ticket)
                else:
                    nursery.start_soon(self._handle, sock, address, ticket)
                await trio.lowlevel.checkpoint()  # a flood of connections must not starve the rest

    async def _admit_then_handle(self, sock: socket.socket, address: Any, source: str | None, handshake: bool) -> None:
        """An accepted socket that found no room: wait for room (the accept loop waits for
        this decision before accepting more), then serve or shed it. Cancelled only with
        the connections (a drain's deadline, closing everything), never by a stop."""
        try:
            tcp = sock.family != socket.AF_UNIX
            while (ticket := self.gate.admit(source, trio.current_time(), handshake=handshake)) is None:
                await self.gate.wait_for_room(handshake=handshake, displace=tcp)
        except BaseException:
            sock.close()
            raise
        finally:
            self._admitted.set()
        if isinstance(ticket, str):
            self._shed(sock, address, source, ticket)
        else:
            await self._handle(sock, address, ticket)

    def _shed(self, sock: socket.socket, address: Any, source: str | None, reason: str) -> None:
        """Reset a new socket at once (SO_LINGER 0: no TIME_WAIT left behind); counted,
        logged summed."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        self.metrics.shed(self.name, reason)
        self._shed_log.record(reason, source, format_sockaddr(address), trio.current_time())

    async def take(self, sock: socket.socket, address: Any, preread: Preread) -> bool:
        """Serve a socket another tunnel on the same address accepted and routed here (by
        SNI): admitted under this tunnel's caps (waiting for room as the accept loop does;
        the caller bounds the wait), then served with `preread`. False if this tunnel
        takes no connections now (stopped); the caller keeps the socket then."""
        if self._connections is None or not self.listening:
            return False
        tcp = sock.family != socket.AF_UNIX
        source = source_key(address) if tcp else None
        while (ticket := self.gate.admit(source, trio.current_time(), handshake=True)) is None:
            await self.gate.wait_for_room(handshake=True, displace=tcp)
        if not self.listening:  # stopped (a reload removed it) while the socket waited for room
            if not isinstance(ticket, str):
                self.gate.release(ticket)
            return False
        if isinstance(ticket, str):
            self._shed(sock, address, source, ticket)
        else:
            self._connections.start_soon(self._handle, sock, address, ticket, preread)
        return True

    async def _route(self, sock: socket.socket, conn: Connection, state: TunnelState) -> Preread | None:
        """A shared address (`sni`): see router.route."""
        members: list[Tunnel] = self._listeners.members(self._bound) or [self]
        return await route(self, sock, conn, state, members, str(self._bound))

    async def _handle(self, sock: socket.socket, address: Any, ticket: Ticket, preread: Preread | None = None) -> None:
        peer = format_sockaddr(address)
        conn = Connection(
            peer=peer,
            since=trio.current_time(),
            address=address,
            ticket=ticket,
            cancel_scope=ticket.cancel_scope,  # cancelled when displaced
        )
        state = self.state  # the connection's own state: a reload does not change it
        try:
            with conn.cancel_scope:
                self.connections[conn.id] = conn
                if sock.family == socket.AF_UNIX:
                    # Before anything else (no handshake, no dial): is this process allowed?
                    conn.credentials = peer_credentials(sock)
                    if state.config.unix.checks_peers:
                        why = unix_peer_refusal(conn.credentials, state.config.unix)
                        if why is not None:
                            refuse(self, conn, PlainStream(sock), why)
                            return
                if state.config.sni and preread is None:
                    preread = await self._route(sock, conn, state)
                    if preread is None:
                        return
                if state.config.mode == "server":
                    await serve_tls_client(self, state, sock, conn, preread)
                else:
                    await serve_plain_client(self, state, sock, conn)
            if ticket.displaced:  # counted and logged (summed) here, not once each
                self.metrics.shed(self.name, SHED_DISPLACED)
                self._shed_log.record(SHED_DISPLACED, ticket.source, peer, trio.current_time())
            elif conn.cancel_scope.cancelled_caught and not conn.closed_logged:
                # Cancelled before the relay could say (mid-handshake, dialling, PROXY header).
                conn.stats.end = conn.stats.end or CLOSED_BY_THE_DAEMON
                self.story.closed(conn)
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
            if conn.metrics_identity is not None:
                self.metrics.identity_bytes(self.name, conn.metrics_identity, conn.stats.bytes_in, conn.stats.bytes_out)
            self.gate.release(ticket)
            if not conn.handed_over:
                sock.close()
