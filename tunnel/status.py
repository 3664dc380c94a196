"""The status address: GET /healthz, GET /metrics (Prometheus text) and GET /connections,
served over plain HTTP/1.1 (one request per connection) for operators and monitoring."""

from __future__ import annotations

import contextlib
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

from tunnel.config import Address

if TYPE_CHECKING:
    from tunnel.metrics import PrometheusMetrics
    from tunnel.tunnel import Tunnel

log = logging.getLogger("tunnel")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0


def health(tunnels: Sequence[Tunnel]) -> tuple[bool, dict[str, Any]]:
    """Healthy when every tunnel is listening."""
    states = {t.name: ("listening" if t.listening else "not listening") for t in tunnels}
    ok = bool(tunnels) and all(t.listening for t in tunnels)
    return ok, {"status": "ok" if ok else "unavailable", "tunnels": states}


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


async def serve_http(
    address: Address, respond: Responder, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `respond(path) -> (status line, content type, body)` on a TCP address, or on a
    unix socket path (a worker's private status address). Only GET is answered (405
    otherwise), and the path reaches `respond` without its query string."""
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
    await trio.serve_listeners(functools.partial(_handle, respond), listeners)


async def _handle(respond: Responder, stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await _read_request(stream)
            if request is None:
                return
            method, target = request
            if method != "GET":
                status, content_type, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            else:
                status, content_type, body = await respond(target.split("?", 1)[0])
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            await stream.send_all(head.encode() + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:  # one bad request must never stop the status server
        log.exception("status request failed")
    finally:
        await trio.aclose_forcefully(stream)


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


async def _read_request(stream: trio.SocketStream) -> tuple[str, str] | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            return None
        data += chunk
        if len(data) > MAX_REQUEST:
            return None
    parts = data.split(b"\n", 1)[0].decode("latin-1").split()
    if len(parts) < 2:
        return None
    return parts[0], parts[1]


def json_body(value: object) -> bytes:
    """A JSON response body."""
    return (json.dumps(value, indent=2) + "\n").encode()


# -- the client side: `tunnel status` ------------------------------------------------------


class StatusUnavailable(Exception):
    """The status address did not answer."""


def fetch(address: Address, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET a status page; (HTTP status, parsed JSON)."""
    import http.client

    host = address.host if ":" not in address.host else f"[{address.host}]"
    connection = http.client.HTTPConnection(host, address.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    except OSError as exc:
        raise StatusUnavailable(f"no answer from {address}: {exc}") from exc
    finally:
        connection.close()
    try:
        return response.status, json.loads(body)
    except ValueError as exc:
        raise StatusUnavailable(f"{address}{path} did not answer JSON") from exc


def render(health_doc: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The terminal view of `tunnel status`: each tunnel's health, then who is connected."""
    lines = [f"status: {health_doc.get('status', '?')}"]
    reload = health_doc.get("reload")
    if isinstance(reload, dict):
        lines.append(f"reload failing since {reload.get('failing_since')}: {reload.get('reason')}")
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
    """Columns padded to their widest cell, two spaces apart; one line per row."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]  # fmt: skip


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


async def start_status(nursery: trio.Nursery, address: Address, respond: Responder, origin: str) -> Any:
    """Start `serve_http` on `address` in `nursery`; its bound address. OSError naming
    `origin` (what asked for it: `--status` or a file's `status:` key) if it cannot listen."""
    try:
        return await nursery.start(serve_http, address, respond)
    except OSError as exc:
        raise OSError(exc.errno, f"{origin}: cannot serve status on {address}: {exc.strerror or exc}") from None
