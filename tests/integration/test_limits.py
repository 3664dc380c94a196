"""A silent crowd must not shut allowed clients out: max_handshakes, per_source and
per_identity_connections with real sockets (see tunnel/limits.py).

Linux routes all of 127/8 to lo, so a socket bound to 127.0.0.2 before it connects to the
tunnel on 127.0.0.1 is a second source on the same machine."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import PKI, backend, echo, expect_refused, hostport, server_doc, write_yaml
from tunnel.config import load_file
from tunnel.metrics import PrometheusMetrics
from tunnel.state import TunnelState
from tunnel.tunnel import Tunnel


@asynccontextmanager
async def tunnel_with_metrics(path: Path) -> AsyncIterator[tuple[Tunnel, str, PrometheusMetrics]]:
    tunnels: list[Tunnel] = []
    metrics = PrometheusMetrics(lambda: tunnels)
    tunnel = Tunnel(TunnelState.build(load_file(path)), metrics)
    tunnels.append(tunnel)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(tunnel.serve)
        yield tunnel, hostport(address) if isinstance(address, tuple) else str(address), metrics
        tunnel.abort()


def limited_doc(p: PKI, target: str, **limits: Any) -> dict[str, Any]:
    doc = server_doc(p, target)
    doc["limits"] = {"handshake_timeout": "10s", "connect_timeout": "2s", **limits}
    return doc


async def connect_from(source: str, address: str) -> trio.socket.SocketType:
    host, _, port = address.rpartition(":")
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        # Shed so soon after accept(2) that connect(2) learnt of it: is_cut says so.
        with contextlib.suppress(ConnectionResetError):
            await sock.connect((host, int(port)))
    except BaseException:  # refused, or cancelled mid-connect: not left for the GC to find
        sock.close()
        raise
    return sock


async def tls_from(p: PKI, source: str, address: str, name: str = "app1") -> trio.SSLStream[trio.SocketStream]:
    stream = trio.SSLStream(
        trio.SocketStream(await connect_from(source, address)), p.client_context(name), server_hostname="localhost"
    )
    await stream.do_handshake()
    return stream


async def echoes(stream: trio.SSLStream[trio.SocketStream]) -> bool:
    with trio.fail_after(5):
        await stream.send_all(b"ping")
        return await stream.receive_some() == b"ping"


async def is_cut(sock: trio.socket.SocketType, within: float = 2.0) -> bool:
    """True if the tunnel ends this silent socket (EOF or reset) within `within` seconds."""
    with trio.move_on_after(within):
        try:
            return await sock.recv(1) == b""
        except ConnectionResetError:
            return True
    return False


async def silent_crowd(source: str, address: str, size: int, *, stop: trio.Event) -> None:
    """`size` silent sockets from `source`, each replaced 50 ms after the tunnel ends it."""

    async def member() -> None:
        while not stop.is_set():
            try:
                sock = await connect_from(source, address)
            except OSError:
                await trio.sleep(0.05)
                continue
            with sock:
                with trio.move_on_after(30):
                    await is_cut(sock, within=30)
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        for _ in range(size):
            nursery.start_soon(member)
        await stop.wait()
        nursery.cancel_scope.cancel()


async def until(condition: Any) -> None:
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def timed_allowed_connects(p: PKI, address: str, source: str, times: int) -> list[float]:
    took = []
    for _ in range(times):
        started = trio.current_time()
        stream = await tls_from(p, source, address)
        took.append(trio.current_time() - started)  # connect + handshake only
        async with stream:
            assert await echoes(stream)
    return took


async def refused_client(p: PKI, source: str, address: str, name: str) -> None:
    """Connect as `name` and expect the tunnel to end the connection without any data."""
    await expect_refused(lambda: tls_from(p, source, address, name))


def shed_count(metrics: PrometheusMetrics, reason: str) -> float:
    for line in metrics.text().decode().splitlines():
        if line.startswith("tunnel_connections_shed_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_silent_crowd_from_one_source_does_not_slow_an_allowed_client_from_another(
    pki_files: PKI, tmp_path: Path
) -> None:
    """A crowd of 60 silent sockets from 127.0.0.1, replaced as they are cut, against
    max_connections 50, max_handshakes 20, per_source.handshakes 10: the crowd is held at
    its cap and the rest reset at once, and an allowed client from 127.0.0.2 connects and
    handshakes in under 100 ms, every time. (Before: the crowd took all 50 slots and the
    client waited in the backlog for a handshake timeout.)"""
    async with backend(echo) as target:
        limits = {"max_connections": 50, "max_handshakes": 20, "per_source": {"handshakes": 10}}
        path = write_yaml(tmp_path / "t.yaml", limited_doc(pki_files, target.address, **limits))
        async with tunnel_with_metrics(path) as (tunnel, address, metrics):
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: silent_crowd("127.0.0.1", address, 60, stop=stop))
                await until(lambda: tunnel.handshaking == 10 and shed_count(metrics, "per_source.handshakes") >= 50)
                took = await timed_allowed_connects(pki_files, address, "127.0.0.2", 10)
                assert tunnel.handshaking <= 10 + 1
                stop.set()
            assert max(took) < 0.1, took
            assert 'tunnel_handshaking_connections{tunnel="t"}' in metrics.text().decode()
    assert target.accepted == 10


async def test_a_crowd_from_many_sources_is_displaced_for_an_allowed_client(pki_files: PKI, tmp_path: Path) -> None:
    """60 silent sockets from six sources fill every handshake slot (each source under its
    cap): a new client from another source displaces the oldest of the busiest source
    instead of waiting for a handshake timeout (10 s here)."""
    async with backend(echo) as target:
        limits = {"max_connections": 50, "max_handshakes": 20, "per_source": {"handshakes": 10}}
        path = write_yaml(tmp_path / "t.yaml", limited_doc(pki_files, target.address, **limits))
        async with tunnel_with_metrics(path) as (tunnel, address, metrics):
            crowd = [await connect_from(f"127.0.0.{3 + i // 10}", address) for i in range(60)]
            try:
                await until(lambda: tunnel.handshaking == 20)
                await trio.sleep(1.2)  # older than DISPLACE_AFTER (1 s): displaceable
                took = await timed_allowed_connects(pki_files, address, "127.0.0.2", 10)
                assert max(took) < 0.1, took
                assert shed_count(metrics, "displaced") >= 1
            finally:
                for sock in crowd:
                    sock.close()
    assert target.accepted == 10


async def test_a_source_at_its_connection_cap_is_reset_at_once_and_others_get_in(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    async with backend(echo) as target:
        limits = {"per_source": {"handshakes": 2, "connections": 3}}
        path = write_yaml(tmp_path / "t.yaml", limited_doc(pki_files, target.address, **limits))
        async with tunnel_with_metrics(path) as (_, address, metrics):
            held = [await tls_from(pki_files, "127.0.0.1", address) for _ in range(3)]
            for stream in held:
                assert await echoes(stream)
            extra = await connect_from("127.0.0.1", address)
            extra_port = extra.getsockname()[1]
            with extra:
                started = trio.current_time()
                assert await is_cut(extra)
                assert trio.current_time() - started < 0.5, "reset at once, not after handshake_timeout"
            other = await tls_from(pki_files, "127.0.0.2", address)
            async with other:
                assert await echoes(other)
            for stream in held:
                await stream.aclose()
            assert shed_count(metrics, "per_source.connections") == 1
    assert target.accepted == 4
    shed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shed ")]
    assert shed == [f"shed tunnel=t peer=127.0.0.1:{extra_port}: per_source.connections (more are summed every 5s)"]


async def test_one_identity_cannot_hold_every_slot(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """per_identity_connections 2: cn=app1's third connection is refused after the
    handshake, before the target is dialled; cn=app2 still gets in."""
    caplog.set_level(logging.INFO, logger="tunnel")
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", limited_doc(pki_files, target.address, per_identity_connections=2))
        async with tunnel_with_metrics(path) as (_, address, metrics):
            held = [await tls_from(pki_files, "127.0.0.1", address, "app1") for _ in range(2)]
            for stream in held:
                assert await echoes(stream)
            await refused_client(pki_files, "127.0.0.1", address, "app1")
            assert target.accepted == 2, "the refused connection never reached the target"
            app2 = await tls_from(pki_files, "127.0.0.1", address, "app2")
            async with app2:
                assert await echoes(app2)
            text = metrics.text().decode()
            assert 'tunnel_connections_refused_total{reason="too many connections",tunnel="t"} 1.0' in text
            for stream in held:
                await stream.aclose()
    assert target.accepted == 3
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert len(refused) == 1
    assert refused[0].startswith(
        "refused: too many connections for cn=app1 (2 open, limits.per_identity_connections) tunnel=t peer=127.0.0.1:"
    )
    assert refused[0].endswith(" identity=cn=app1")


async def test_a_reload_changes_the_per_source_caps_live(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        path = tmp_path / "t.yaml"
        write_yaml(path, limited_doc(pki_files, target.address, per_source={"handshakes": 2}))
        async with tunnel_with_metrics(path) as (tunnel, address, _):
            silent = [await connect_from("127.0.0.1", address) for _ in range(2)]
            await until(lambda: tunnel.handshaking == 2)
            third = await connect_from("127.0.0.1", address)
            assert await is_cut(third, within=1)
            third.close()
            write_yaml(path, limited_doc(pki_files, target.address, per_source={"handshakes": 3}))
            tunnel.replace_state(TunnelState.build(load_file(path)))
            third = await connect_from("127.0.0.1", address)
            silent.append(third)
            await until(lambda: tunnel.handshaking == 3)
            assert not await is_cut(third, within=0.3)
            write_yaml(path, limited_doc(pki_files, target.address, per_source={"handshakes": 1}))
            tunnel.replace_state(TunnelState.build(load_file(path)))
            assert not await is_cut(silent[0], within=0.2), "a lowered cap closes nothing already open"
            fourth = await connect_from("127.0.0.1", address)
            with fourth:
                assert await is_cut(fourth, within=1)
            for sock in silent:
                sock.close()


async def test_a_unix_listener_keeps_only_the_global_caps(pki_files: PKI, tmp_path: Path) -> None:
    """No source address on a unix socket: per_source does not apply, and when the
    handshake slots are full a new connection waits (in the backlog), nothing is reset."""
    async with backend(echo) as target:
        doc = limited_doc(pki_files, target.address, max_handshakes=3, per_source={"handshakes": 1})
        doc["listen"] = f"unix:{tmp_path / 't.sock'}"
        path = write_yaml(tmp_path / "t.yaml", doc)
        async with tunnel_with_metrics(path) as (tunnel, sock_path, metrics):
            silent = []
            for _ in range(3):
                sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                await sock.connect(sock_path)
                silent.append(sock)
            await until(lambda: tunnel.handshaking == 3)
            waiting = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await waiting.connect(sock_path)
            assert not await is_cut(waiting, within=1.2), "neither reset nor displaced"
            assert len(tunnel.connections) == 3, "left in the backlog"
            silent.pop(0).close()  # a slot frees: the waiting connection is accepted
            stream = trio.SSLStream(
                trio.SocketStream(waiting), pki_files.client_context("app1"), server_hostname="localhost"
            )
            async with stream:
                with trio.fail_after(5):
                    await stream.do_handshake()
                assert await echoes(stream)
            for sock in silent:
                sock.close()
            assert "tunnel_connections_shed_total{" not in metrics.text().decode()
    assert target.accepted == 1
