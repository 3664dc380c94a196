"""A stop never resets a connection the accept loop has accepted: once accept(2) has
returned a socket it is served (or drained), never closed unread (issue 16)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trio

from tests.helpers import PKI, backend, echo, make_pki, server_doc, write_yaml
from tunnel.config import Address, load_file
from tunnel.listener import Listeners, bind_listener
from tunnel.state import TunnelState
from tunnel.tunnel import Tunnel

CLIENTS = 300


async def _client(p: PKI, port: int, outcomes: dict[str, int], index: int) -> None:
    payload = b"%05d" % index * 20
    try:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        outcomes["refused"] += 1
        return
    stream = trio.SSLStream(tcp, p.client_context("app1"), server_hostname="localhost")
    try:
        await stream.do_handshake()
        await stream.send_all(payload)
        got = b""
        while len(got) < len(payload):
            data = await stream.receive_some()
            if not data:
                break
            got += data
        outcomes["served" if got == payload else "cut"] += 1
    except (trio.BrokenResourceError, ssl.SSLError):
        outcomes["reset"] += 1
    finally:
        with trio.CancelScope(shield=True):
            await tcp.aclose()


async def _round(p: PKI, tmp: Path, doc: dict[str, Any]) -> dict[str, int]:
    """A flood of TLS clients; the tunnel stops (drain) while it is accepting them. The
    test keeps its own copy of the listening socket, so the connects still queued when the
    tunnel lets go of it wait there instead of being reset with the socket: any reset a
    client sees then comes from a socket the tunnel accepted."""
    listening = bind_listener(Address(host="127.0.0.1", port=0))
    port = listening.getsockname()[1]
    copy = listening.dup()  # the queue outlives the tunnel's socket
    listeners = Listeners()
    listeners.adopt(Address(host="127.0.0.1", port=port), listening)
    path = write_yaml(tmp / "t.yaml", {**doc, "listen": f"127.0.0.1:{port}"})
    outcomes = {"served": 0, "reset": 0, "refused": 0, "cut": 0}
    tunnel = Tunnel(TunnelState.build(load_file(path)), listeners=listeners)
    try:
        async with trio.open_nursery() as clients:
            async with trio.open_nursery() as serving:
                await serving.start(tunnel.serve)
                for index in range(CLIENTS):
                    clients.start_soon(_client, p, port, outcomes, index)
                while tunnel.gate.connections + outcomes["served"] < 20:
                    await trio.lowlevel.checkpoint()
                tunnel.stop()  # drain: what it accepted is served within drain_timeout
            await trio.sleep(1)  # the last served clients read their echo
            clients.cancel_scope.cancel()  # the rest wait in the queue, neither served nor reset
    finally:
        copy.close()
    return outcomes


async def test_a_stop_while_connections_arrive_resets_none_it_accepted(tmp_path: Path) -> None:
    p = make_pki(tmp_path)
    async with backend(echo) as target:
        doc = server_doc(p, target.address)
        doc["allow"] = {"cn": ["app1"]}
        doc["limits"].update(
            {
                "handshake_timeout": "10s",
                "drain_timeout": "10s",
                "max_handshakes": 1000,
                "per_source": {"connections": 1000, "handshakes": 1000},
            }
        )
        totals = {"served": 0, "reset": 0, "refused": 0, "cut": 0}
        for _ in range(5):
            for key, value in (await _round(p, tmp_path, doc)).items():
                totals[key] += value
    assert totals["served"] >= 50
    assert totals["reset"] == 0, totals
    assert totals["cut"] == 0, totals
    assert totals["refused"] == 0, totals
