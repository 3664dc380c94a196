"""The status address: GET /healthz, GET /metrics (Prometheus text) and GET /connections,
served over plain HTTP/1.1 (one request per connection, through tunnel.http) for operators
and monitoring."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST

from tunnel import http
from tunnel.config import Address
from tunnel.logs import escape

if TYPE_CHECKING:
    from tunnel.metrics import PrometheusMetrics
    from tunnel.tunnel import Tunnel

log = logging.getLogger("tunnel")


def health(tunnels: Sequence[Tunnel]) -> tuple[bool, dict[str, Any]]:
    """Healthy when every tunnel is listening and accepting: (ok, the /healthz document).
    A tunnel's state is `listening`, `not listening`, or `accept failing: REASON` while
    accept(2) keeps failing for want of file descriptors or memory (`Too many open
    files`): it is bound, but new connections wait in the kernel backlog."""
    states = {t.name: _tunnel_state(t) for t in tunnels}
    ok = bool(tunnels) and all(state == "listening" for state in states.values())
    return ok, {"status": "ok" if ok else "unavailable", "tunnels": states}


def _tunnel_state(tunnel: Tunnel) -> str:
    if not tunnel.listening:
        return "not listening"
    if tunnel.accept_failing is not None:
        return f"accept failing: {tunnel.accept_failing}"
    return "listening"


def connections(tunnels: Sequence[Tunnel]) -> list[dict[str, Any]]:
    """Every open connection: tunnel, peer, identity, since (UTC), bytes each way."""
    now_wall, now = time.time(), trio.current_time()
    rows = []
    for tunnel in tunnels:
        for conn in tunnel.connections.values():
            since = now_wall - (now - conn.since)
            rows.append(
                {
                    "tunnel": tunnel.name,
                    "peer": conn.peer,
                    "identity": conn.identity.describe() if conn.identity else None,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
                    "seconds": round(now - conn.since, 3),
                    "bytes_in": conn.stats.bytes_in,
                    "bytes_out": conn.stats.bytes_out,
                }
            )
    return rows


Responder = Callable[[str], Awaitable[tuple[str, str, bytes]]]

# The status address must never cost the tunnels their file descriptors, nor be held by
# clients that say nothing: at most this many connections at once, each given this long
# to send its request and this long to take the answer.
MAX_STATUS_CONNECTIONS = 32
REQUEST_TIMEOUT = 2.0
RESPONSE_TIMEOUT = 5.0
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _StatusConnections:
    """The open status connections, oldest first, and whether each is still waiting for
    its request; and one spare file descriptor.

    A connection past the cap closes the oldest that is still waiting (an idle or slow
    client: a monitoring probe sends its request at once), or, when every one is being
    answered, is closed itself at once: no more than `limit` descriptors are held.

    The spare (/dev/null, opened up front) is what lets /healthz answer while the daemon
    is out of descriptors, which is when it matters most: accept(2) fails with EMFILE,
    so the spare is closed and accept tried again at once, and the connection it brings
    in gives its descriptor back to the spare when it closes. Both steps run without a
    trio checkpoint in between, so no tunnel's accept can take the descriptor meanwhile."""

    def __init__(self, limit: int = MAX_STATUS_CONNECTIONS) -> None:
        self.limit = limit
        self.open: dict[trio.SocketStream, bool] = {}  # stream -> still reading its request
        self._spare: int | None = _open_spare()
        self._on_spare: trio.SocketStream | None = None  # the connection using the spare's descriptor

    def accept(self, sock: socket.socket) -> trio.SocketStream | None:
        """The next connection on a listening non-blocking socket, or None for now (no
        connection waiting, or one past the cap closed at once). OSError from accept(2),
        but for EMFILE/ENFILE while the spare is free: then the spare is used."""
        try:
            conn, _ = sock.accept()
            spare = False
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or self._spare is None:
                raise
            os.close(self._spare)
            self._spare = None
            try:
                conn, _ = sock.accept()
            except OSError:
                self._spare = _open_spare()
                raise
            spare = True
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        if spare:
            self._on_spare = stream
        if len(self.open) >= self.limit:
            oldest = next((s for s, reading in self.open.items() if reading), None)
            if oldest is None:
                self.release(stream)
                return None
            self.release(oldest)  # its handler, waiting to read, sees ClosedResourceError
        self.open[stream] = True
        return stream

    def answering(self, stream: trio.SocketStream) -> None:
        if stream in self.open:
            self.open[stream] = False

    def release(self, stream: trio.SocketStream) -> None:
        """Close the connection now (synchronously), and if it held the spare's
        descriptor, take that back for the spare."""
        self.open.pop(stream, None)
        stream.socket.close()
        if stream is self._on_spare:
            self._on_spare = None
            self._spare = _open_spare()

    def close_spare(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


async def serve_http(
    address: Address,
    respond: Responder,
    *,
    max_connections: int = MAX_STATUS_CONNECTIONS,
    sockets: list[socket.socket] | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `respond(path) -> (status line, content type, body)` on a TCP address, or on a
    unix socket path (a worker's private status address). Only GET is answered (405
    otherwise), and the path reaches `respond` without its query string; a malformed
    request gets 400 (see tunnel.http.serve_one).

    At most `max_connections` connections are open at once, over all the address's
    listeners (see _StatusConnections for who gives way, and for the spare descriptor
    that answers while the daemon is out of them); a client has REQUEST_TIMEOUT seconds
    to send its request and RESPONSE_TIMEOUT seconds to take the answer. Out of file
    descriptors with the spare in use, accepting pauses for 100 ms at a time (the
    connection waits in the kernel backlog).

    `sockets`: listening sockets for `address` handed over by an upgrade, served instead
    of binding it (an empty list: bind, and the list is filled with the sockets bound, so
    that an upgrade can hand them on)."""
    if sockets:
        listening = list(sockets)
        task_status.started(listening[0].getsockname())
        log.info("status listening on %s", address, extra={"event": "status_listening", "fields": {}})
        await _serve_listening(listening, respond, max_connections)
        return
    if address.path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(address.path)
        sock.listen(64)
        listeners: list[trio.SocketListener] = [trio.SocketListener(sock)]
    else:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host or None)
        log.info("status listening on %s", address, extra={"event": "status_listening", "fields": {}})
    task_status.started(listeners[0].socket.getsockname())
    # Plain sockets from here: accept(2) is called directly, so that the spare can be
    # closed and the call retried with nothing in between.
    listening = [socket.socket(fileno=listener.socket.detach()) for listener in listeners]
    if sockets is not None:
        sockets.extend(listening)
    await _serve_listening(listening, respond, max_connections)


async def _serve_listening(listening: list[socket.socket], respond: Responder, max_connections: int) -> None:
    connections = _StatusConnections(max_connections)
    try:
        async with trio.open_nursery() as nursery:
            for each in listening:
                each.setblocking(False)
                nursery.start_soon(_accept_loop, each, respond, connections, nursery)
    finally:
        for each in listening:
            trio.lowlevel.notify_closing(each)
            each.close()
        connections.close_spare()


async def _accept_loop(
    sock: socket.socket, respond: Responder, connections: _StatusConnections, nursery: trio.Nursery
) -> None:
    while True:
        try:
            stream = connections.accept(sock)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                await trio.sleep(0.1)
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue
            raise
        if stream is not None:
            nursery.start_soon(_handle, respond, connections, stream)
        await trio.lowlevel.checkpoint()  # a flood of connections must not starve the answers


async def _handle(respond: Responder, connections: _StatusConnections, stream: trio.SocketStream) -> None:
    async def answer(request: http.Request) -> http.Response:
        status, content_type, body = await respond(request.path)
        return http.Response(int(status.split()[0]), content_type, body)

    try:
        await http.serve_one(
            stream,
            answer,
            request_timeout=REQUEST_TIMEOUT,
            response_timeout=RESPONSE_TIMEOUT,
            received=lambda: connections.answering(stream),
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:  # one bad request must never stop the status server
        log.exception("status request failed")
    finally:
        connections.release(stream)


class StatusServer:
    """Answers status requests about the tunnels `tunnels()` returns at request time."""

    def __init__(
        self,
        tunnels: Callable[[], Sequence[Tunnel]],
        metrics: PrometheusMetrics,
        *,
        serving: Callable[[], Sequence[Tunnel]] | None = None,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """`tunnels`: every tunnel with connections to show; `serving`: the ones health
        is judged by (default: all). A tunnel a reload removed drains without listening,
        and must not make the daemon look unhealthy meanwhile. `extra`: more keys for
        the /healthz document (a reload that keeps failing)."""
        self._tunnels = tunnels
        self._serving = serving or tunnels
        self._metrics = metrics
        self._extra = extra or dict

    async def respond(self, path: str) -> tuple[str, str, bytes]:
        """(status line, content type, body) for a GET of `path` (no query string)."""
        await trio.lowlevel.checkpoint()
        tunnels = self._tunnels()
        if path == "/healthz":
            ok, body = health(self._serving())
            body.update(self._extra())
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", json_body(body)
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.text()
        if path == "/connections":
            return "200 OK", "application/json", json_body({"connections": connections(tunnels)})
        return "404 Not Found", "text/plain", NOT_FOUND


NOT_FOUND = b"try /healthz, /metrics or /connections\n"


def json_body(value: object) -> bytes:
    """A JSON response body."""
    return (json.dumps(value, indent=2) + "\n").encode()


# -- the client side: `tunnel status` ------------------------------------------------------


class StatusUnavailable(Exception):
    """The status address did not answer."""


def fetch(address: Address, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET a status page; (HTTP status, parsed JSON). StatusUnavailable if there is no
    answer (`no answer from ADDRESS: REASON`) or it is not JSON."""
    try:
        response = trio.run(lambda: http.fetch(address, path, within=timeout))
    except http.NoAnswer as exc:
        raise StatusUnavailable(f"no answer from {address}: {exc}") from exc
    try:
        return response.status, json.loads(response.body)
    except ValueError as exc:
        raise StatusUnavailable(f"{address}{path} did not answer JSON") from exc


def render(health_doc: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The terminal view of `tunnel status`: each tunnel's health, then who is connected.
    Every value shown passes through logs.escape: peers and certificate names are the
    peer's to choose, and must neither break the table nor reach the terminal as control
    sequences."""
    lines = [f"status: {escape(str(health_doc.get('status', '?')))}"]
    reload = health_doc.get("reload")
    if isinstance(reload, dict):
        since, reason = (escape(str(reload.get(key))) for key in ("failing_since", "reason"))
        lines.append(f"reload failing since {since}: {reason}")
    renewal = health_doc.get("renewal")
    if isinstance(renewal, dict):
        for name, failure in renewal.items():
            if isinstance(failure, dict):
                since, reason = (escape(str(failure.get(key))) for key in ("failing_since", "reason"))
                lines.append(f"renewal of {escape(str(name))} failing since {since}: {reason}")
    lines.append("")
    tunnels = health_doc.get("tunnels", {})
    lines += text_table(["TUNNEL", "STATE", "OPEN"], [
        [name, state, str(sum(1 for r in rows if r["tunnel"] == name))] for name, state in tunnels.items()
    ])  # fmt: skip
    lines.append("")
    if rows:
        lines += text_table(
            ["TUNNEL", "PEER", "IDENTITY", "SINCE", "IN", "OUT"],
            [
                [r["tunnel"], r["peer"], r["identity"] or "-", r["since"], _size(r["bytes_in"]), _size(r["bytes_out"])]
                for r in rows
            ],
        )
    else:
        lines.append("no open connections")
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; one line per row. Each cell
    is shown as logs.escape renders it (no newline or control character gets through)."""
    cells = [[escape(str(cell)) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in cells]  # fmt: skip


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


async def start_status(
    nursery: trio.Nursery, address: Address, respond: Responder, origin: str, sockets: list[socket.socket] | None = None
) -> Any:
    """Start `serve_http` on `address` in `nursery`; its bound address. OSError naming
    `origin` (what asked for it: `--status` or a file's `status:` key) if it cannot listen.
    `sockets`: see serve_http."""
    try:
        return await nursery.start(functools.partial(serve_http, address, respond, sockets=sockets))
    except OSError as exc:
        raise OSError(exc.errno, f"{origin}: cannot serve status on {address}: {exc.strerror or exc}") from None
