"""A server tunnel on its own: who gets in, who is refused and why, and what the target sees."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import socket
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import (
    PKI,
    backend,
    echo,
    echo_or_closed,
    expect_refused,
    issue_dated,
    issue_hostile,
    read_until_closed,
    running_tunnel,
    server_doc,
    speak_first,
    tcp_connect,
    tls_connect,
    write_padded_chain,
    write_yaml,
)
from tunnel.config import load_file
from tunnel.state import TunnelState


async def roundtrip(p: PKI, address: str, name: str) -> bytes:
    stream = await tls_connect(p, address, name)
    async with stream:
        with trio.fail_after(5):
            await stream.send_all(b"ping")
            return bytes(await stream.receive_some())


async def test_allowed_client_by_cn_reaches_the_target(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            assert await roundtrip(pki_files, address, "app1") == b"ping"
    assert target.accepted == 1


@pytest.mark.parametrize(
    ("allow", "client"),
    [
        ({"ou": ["payments"]}, "app2"),
        ({"uri": ["spiffe://example.org/app2"]}, "app2"),
        ({"dns": ["nothing"], "cn": ["app2"]}, "app2"),
        ({"any": True}, "stranger"),
        ("fingerprint", "stranger"),
    ],
)
async def test_each_allow_kind_admits(pki_files: PKI, tmp_path: Path, allow: Any, client: str) -> None:
    if allow == "fingerprint":
        fp = pki_files.fingerprint(client)
        allow = {"fingerprint": [":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()]}
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address, allow=allow))
        async with running_tunnel(path) as (_, address):
            assert await roundtrip(pki_files, address, client) == b"ping"
    assert target.accepted == 1


async def test_large_random_transfer_through_a_server_tunnel(pki_files: PKI, tmp_path: Path) -> None:
    payload = os.urandom(16 * 1024 * 1024)
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            stream = await tls_connect(pki_files, address, "app1")
            digest = hashlib.sha256()
            received = 0
            async with stream:
                with trio.fail_after(60):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stream.send_all, payload)
                        while received < len(payload):
                            data = await stream.receive_some()
                            digest.update(data)
                            received += len(data)
    assert digest.digest() == hashlib.sha256(payload).digest()


async def test_target_that_speaks_first_is_dialled_without_waiting(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(speak_first) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            stream = await tls_connect(pki_files, address, "app1")
            async with stream:
                with trio.fail_after(5):
                    assert await stream.receive_some() == b"hello from the target\n"


async def refused_client(p: PKI, address: str, name: str, **kwargs: Any) -> None:
    """Connect as `name` and expect the tunnel to end the connection without any data."""
    await expect_refused(lambda: tls_connect(p, address, name, **kwargs))


REFUSALS = [
    ("other-app1", "unknown CA"),
    ("", "no certificate"),
    ("expired", "certificate expired"),
    ("stranger", "not allowed: matches none of allow.cn, allow.ou"),
]


@pytest.mark.parametrize(("client", "reason"), REFUSALS)
async def test_refused_clients_never_reach_the_target(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, client: str, reason: str
) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            await refused_client(pki_files, address, client)
            await wait_for_log(caplog, "refused:")
            # and the tunnel still serves an allowed client afterwards
            assert await roundtrip(pki_files, address, "app1") == b"ping"
    assert target.accepted == 1, "only the allowed client may cost the target a connection"
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert len(refused) == 1
    assert refused[0].startswith(f"refused: {reason}")
    assert "peer=127.0.0.1:" in refused[0]


def hostile_context(p: PKI, tmp: Path, kind: str) -> ssl.SSLContext:
    """app1's client context, made hostile: offering only ffdhe8192 (a TLS 1.3 key exchange
    that costs the server ~120 ms), or sending 150 junk certificates after its own (~96 KB)."""
    ctx = p.client_context("app1")
    if kind == "ffdhe8192":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_ecdh_curve("ffdhe8192")  # OpenSSL 3: the group list, ffdhe ones included
    else:
        ctx.load_cert_chain(write_padded_chain(p.crt("app1"), tmp / "padded.pem"), p.key("app1"))
    return ctx


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("ffdhe8192", "no shared key exchange group"), ("padded-chain", "certificate list too long")],
)
async def test_costly_handshakes_are_refused_and_say_why(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str, reason: str
) -> None:
    ctx = hostile_context(pki_files, tmp_path, kind)
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            host, _, port = address.rpartition(":")
            stream = trio.SSLStream(await trio.open_tcp_stream(host, int(port)), ctx, server_hostname="localhost")

            async def handshake_then_read() -> None:
                await stream.do_handshake()
                await stream.receive_some()  # TLS 1.3: a refusal after the client's Finished

            with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                await handshake_then_read()
            await stream.transport_stream.aclose()
            await wait_for_log(caplog, "refused:")
            assert await roundtrip(pki_files, address, "app1") == b"ping"
    assert target.accepted == 1
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert refused == [refused[0]]
    assert refused[0].startswith(f"refused: {reason} tunnel="), refused


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    with trio.fail_after(5):
        while not any(text in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a TLS handshake"),
        (os.urandom(64), "not a TLS handshake"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "closed during the handshake"),
    ],
    ids=["http", "random", "truncated-client-hello"],
)
async def test_garbage_is_refused_and_the_target_sees_nothing(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, payload: bytes, reason: str
) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            async with await tcp_connect(address) as stream:
                with contextlib.suppress(trio.BrokenResourceError):  # the tunnel may reset first
                    await stream.send_all(payload)
                    await stream.send_eof()
                with trio.fail_after(5):
                    await read_until_closed(stream)
            await wait_for_log(caplog, "refused:")
            assert await roundtrip(pki_files, address, "app1") == b"ping"
    assert target.accepted == 1
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert refused[0].startswith(f"refused: {reason}"), refused


async def test_silent_client_is_closed_after_the_handshake_timeout(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address, limits={"handshake_timeout": "300ms"})
        path = write_yaml(tmp_path / "t.yaml", doc)
        async with running_tunnel(path) as (_, address):
            async with await tcp_connect(address) as stream:
                with trio.fail_after(5):
                    assert await read_until_closed(stream) == b""
            await wait_for_log(caplog, "refused: handshake timeout")
    assert target.accepted == 0


async def test_tls_1_1_is_refused(pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            ctx = pki_files.client_context("app1")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_1
                ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            tcp = await tcp_connect(address)
            stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                await stream.do_handshake()
            await tcp.aclose()
            await wait_for_log(caplog, "refused:")
    assert target.accepted == 0
    assert any("refused: TLS version too old" in r.getMessage() for r in caplog.records)


async def test_min_version_1_3_refuses_tls_1_2(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address)
        doc["tls"]["min_version"] = "1.3"
        path = write_yaml(tmp_path / "t.yaml", doc)
        async with running_tunnel(path) as (_, address):
            ctx = pki_files.client_context("app1")
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            tcp = await tcp_connect(address)
            stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(5):
                await stream.do_handshake()
            await tcp.aclose()
            assert await roundtrip(pki_files, address, "app1") == b"ping"
    assert target.accepted == 1


async def test_dead_target_closes_the_client_promptly(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.helpers import free_port

    path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, f"127.0.0.1:{free_port()}"))
    async with running_tunnel(path) as (_, address):
        stream = await tls_connect(pki_files, address, "app1")
        async with stream:
            with trio.fail_after(5):
                try:
                    data = await stream.receive_some()
                except trio.BrokenResourceError:
                    data = b""
        assert data == b""
        await wait_for_log(caplog, "target unavailable")


async def test_failover_to_the_second_target(pki_files: PKI, tmp_path: Path) -> None:
    from tests.helpers import free_port

    async with backend(echo) as target:
        doc = server_doc(pki_files, [f"127.0.0.1:{free_port()}", target.address])
        path = write_yaml(tmp_path / "t.yaml", doc)
        async with running_tunnel(path) as (_, address):
            assert await roundtrip(pki_files, address, "app1") == b"ping"
    assert target.accepted == 1


async def test_tls_1_2_client_is_served(pki_files: PKI, tmp_path: Path) -> None:
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            ctx = pki_files.client_context("app1")
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            tcp = await tcp_connect(address)
            stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
            async with stream:
                with trio.fail_after(5):
                    await stream.send_all(b"twelve")
                    assert await stream.receive_some() == b"twelve"
                    cipher = stream.cipher()
                    assert cipher is not None
                    assert "GCM" in cipher[0] or "CHACHA20" in cipher[0]


async def test_tls_1_2_refusals_carry_the_tls_alert(pki_files: PKI, tmp_path: Path) -> None:
    """With TLS 1.2 the client learns why in the handshake: OpenSSL's alert is delivered."""
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            for client, alert in [("expired", "CERTIFICATE_EXPIRED"), ("other-app1", "UNKNOWN_CA")]:
                ctx = pki_files.client_context(client)
                ctx.maximum_version = ssl.TLSVersion.TLSv1_2
                tcp = await tcp_connect(address)
                stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
                with pytest.raises(trio.BrokenResourceError) as info, trio.fail_after(5):
                    await stream.do_handshake()
                await tcp.aclose()
                cause = info.value.__cause__
                assert isinstance(cause, ssl.SSLError)
                assert alert in str(cause.reason), cause
    assert target.accepted == 0


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_tasks_return_to_baseline_after_every_kind_of_failure(pki_files: PKI, tmp_path: Path) -> None:
    from tests.helpers import free_port

    async with backend(echo) as target:
        doc = server_doc(pki_files, [f"127.0.0.1:{free_port()}", target.address])
        doc["limits"] = {"handshake_timeout": "300ms", "idle_timeout": "300ms"}
        path = write_yaml(tmp_path / "t.yaml", doc)
        async with running_tunnel(path) as (tunnel, address):
            await trio.sleep(0.05)
            baseline = count_tasks()
            for client in ("other-app1", "", "expired", "stranger"):
                await refused_client(pki_files, address, client)
            async with await tcp_connect(address) as silent:
                with trio.fail_after(5):
                    await read_until_closed(silent)
            async with await tcp_connect(address) as garbage:
                with contextlib.suppress(trio.BrokenResourceError):
                    await garbage.send_all(os.urandom(100))
                with trio.fail_after(5):
                    await read_until_closed(garbage)
            idle = await tls_connect(pki_files, address, "app1")
            async with idle:
                with trio.fail_after(5):
                    await read_until_closed(idle)  # reaped after idle_timeout
            assert await roundtrip(pki_files, address, "app1") == b"ping"
            with trio.fail_after(5):
                while tunnel.connections or count_tasks() != baseline:  # noqa: ASYNC110
                    await trio.sleep(0.01)


async def test_tls_1_3_client_that_writes_first_still_reads_the_alert(pki_files: PKI, tmp_path: Path) -> None:
    """The refusal alert must not be lost to a reset when the client sends data first."""
    async with backend(echo) as target:
        path = write_yaml(tmp_path / "t.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(path) as (_, address):
            for _ in range(20):
                stream = await tls_connect(pki_files, address, "")  # TLS 1.3: completes client-side
                with trio.fail_after(5):
                    await stream.send_all(b"ping")  # buffered locally: succeeds either way
                    with pytest.raises(trio.BrokenResourceError) as info:
                        await stream.receive_some()
                await trio.aclose_forcefully(stream)
                cause = info.value.__cause__
                assert isinstance(cause, ssl.SSLError)
                assert "CERTIFICATE_REQUIRED" in str(cause.reason), cause
    assert target.accepted == 0


def brief_client(p: PKI, tmp: Path, seconds: int = 3) -> tuple[dt.datetime, ssl.SSLContext]:
    """A client context presenting `brief`, a certificate from the CA that expires in
    `seconds`; and when it expires."""
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=seconds)
    issue_dated(p.dir, "brief", not_before=expires - dt.timedelta(days=1), not_after=expires, out=tmp)
    ctx = p.client_context("")
    ctx.load_cert_chain(tmp / "brief.crt", tmp / "brief.key")
    return expires, ctx


def _blocking_echo(ctx: ssl.SSLContext, address: str, session: ssl.SSLSession | None) -> tuple[ssl.SSLSocket, bytes]:
    """One TLS connection with the stdlib (it can offer a session); returns it and the echo."""
    host, _, port = address.rpartition(":")
    raw = socket.create_connection((host, int(port)), timeout=5)
    tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    try:
        tls.sendall(b"hi")
        return tls, tls.recv(10)
    except OSError:
        return tls, b""


async def test_a_resumed_session_is_refused_once_its_certificate_has_expired(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenSSL checks a certificate only in a full handshake; each resumption hands out a
    new ticket, so a client that keeps resuming would never be checked again."""
    caplog.set_level(logging.INFO, logger="tunnel")
    expires, ctx = brief_client(pki_files, tmp_path)
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address, allow={"cn": ["brief"]})
        async with running_tunnel(write_yaml(tmp_path / "s.yaml", doc)) as (_, address):
            first, data = await trio.to_thread.run_sync(_blocking_echo, ctx, address, None)
            assert data == b"hi"
            session = first.session
            with trio.fail_after(5):
                await trio.to_thread.run_sync(first.unwrap)  # a clean close keeps the session cached
            first.close()
            await trio.sleep((expires - dt.datetime.now(dt.UTC)).total_seconds() + 1.1)
            again, data = await trio.to_thread.run_sync(_blocking_echo, ctx, address, session)
            resumed = again.session_reused
            again.close()
            assert resumed  # so only the tunnel's own check can refuse it
            assert data == b""
            await wait_for_log(caplog, "refused: certificate expired")
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert len(refused) == 1
    assert refused[0].startswith("refused: certificate expired tunnel=s peer=")
    assert refused[0].endswith(" identity=cn=brief")  # named: refused after the handshake, by the tunnel


async def test_a_connection_cut_by_a_reload_while_dialling_is_logged_as_closed(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """revalidate() says why and cancels; a connection still dialling its target (here a
    black hole) must still get its closed line, with that reason."""
    caplog.set_level(logging.INFO, logger="tunnel")
    with socket.socket() as blackhole:  # a full backlog: the kernel drops further SYNs
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        fillers = [socket.socket() for _ in range(8)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(blackhole.getsockname())
            target = f"127.0.0.1:{blackhole.getsockname()[1]}"
            doc = server_doc(pki_files, target, limits={"handshake_timeout": "5s", "connect_timeout": "5s"})
            async with running_tunnel(write_yaml(tmp_path / "s.yaml", doc)) as (tunnel, address):
                async with await tls_connect(pki_files, address, "app1"):
                    with trio.fail_after(5):
                        while not any(c.identity for c in tunnel.connections.values()):  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    doc["allow"] = {"cn": ["app2"]}
                    tunnel.replace_state(TunnelState.build(load_file(write_yaml(tmp_path / "s.yaml", doc))))
                    tunnel.revalidate()
                    await wait_for_log(caplog, "closed tunnel=")
        finally:
            for filler in fillers:
                filler.close()
    closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closed tunnel=")]
    assert len(closed) == 1
    assert "identity=cn=app1" in closed[0]
    assert closed[0].endswith("why=closed on reload: no longer allowed (not allowed: matches none of allow.cn)")


# cryptography warns when it reads a CN over 64 characters, and the tests make warnings errors.
@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
@pytest.mark.parametrize(
    ("size", "reason"),
    [
        (20_000, "identity too long (20000 bytes)"),  # past the 1 KiB bound on a name
        (70_000, "certificate list too long"),  # past the 32 KiB bound on what a peer may send
    ],
)
async def test_a_huge_common_name_is_refused_before_the_target_is_dialled(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, size: int, reason: str
) -> None:
    """A 70,000-byte CN with PROXY v2 used to dial the target, then fail with a traceback
    and no closed line."""
    caplog.set_level(logging.INFO, logger="tunnel")
    crt, key = issue_hostile(pki_files.dir, tmp_path, "huge", "a" * size, ou="payments")
    context = pki_files.client_context("")
    context.load_cert_chain(crt, key)
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address, proxy_protocol="v2")  # allow.ou: payments admits it
        async with running_tunnel(write_yaml(tmp_path / "t.yaml", doc)) as (_, address):
            tcp = await tcp_connect(address)
            stream = trio.SSLStream(tcp, context, server_hostname="localhost")
            with trio.fail_after(5):
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.do_handshake()
                    await stream.send_all(b"ping")
                assert await read_until_closed(stream) == b""
            await trio.aclose_forcefully(stream)
    assert target.accepted == 0
    messages = [r.getMessage() for r in caplog.records]
    refused = [m for m in messages if m.startswith("refused:")]
    assert len(refused) == 1
    assert refused[0].startswith(f"refused: {reason} tunnel="), refused[0][:300]
    if size == 20_000:
        assert "identity=cn=" + "a" * 64 + f"... ({size} bytes)" in refused[0]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("close_on_expiry", [True, False])
async def test_a_connection_is_closed_when_its_peer_certificate_expires(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture, close_on_expiry: bool
) -> None:
    """limits.close_on_expiry (default true): a connection lasts no longer than the
    certificate that authorised it, as revocation cuts it on reload."""
    caplog.set_level(logging.INFO, logger="tunnel")
    expires, ctx = brief_client(pki_files, tmp_path)
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address, allow={"cn": ["brief"]})
        if not close_on_expiry:
            doc["limits"]["close_on_expiry"] = False
        async with running_tunnel(write_yaml(tmp_path / "s.yaml", doc)) as (_, address):
            host, _, port = address.rpartition(":")
            stream = trio.SSLStream(await trio.open_tcp_stream(host, int(port)), ctx, server_hostname="localhost")
            with trio.fail_after(5):
                await stream.send_all(b"ping")
                assert await stream.receive_some(4) == b"ping"
            await trio.sleep((expires - dt.datetime.now(dt.UTC)).total_seconds() + 1.5)
            got = await echo_or_closed(stream, b"pong")
            await trio.aclose_forcefully(stream)
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing ")]
    if close_on_expiry:
        assert got == b""
        assert closing
        assert closing[0].endswith(": certificate expired")
    else:
        assert got == b"pong"
        assert not closing


async def test_without_close_on_expiry_a_reload_keeps_a_connection_whose_peer_certificate_expired(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """limits.close_on_expiry false lets a connection outlive its peer's certificate,
    reloads included: a reload (tls.renew makes one per renewal) judges the chain as it
    stood before it expired, so only a change of trust (revocation, CA, allow) closes it."""
    caplog.set_level(logging.INFO, logger="tunnel")
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=2)
    issue_dated(pki_files.dir, "brief", not_before=expires - dt.timedelta(days=1), not_after=expires, out=tmp_path)
    ctx = pki_files.client_context("")
    ctx.load_cert_chain(tmp_path / "brief.crt", tmp_path / "brief.key")
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address, allow={"cn": ["brief"]})
        doc["limits"]["close_on_expiry"] = False
        path = write_yaml(tmp_path / "s.yaml", doc)
        async with running_tunnel(path) as (tunnel, address):
            host, _, port = address.rpartition(":")
            stream = trio.SSLStream(await trio.open_tcp_stream(host, int(port)), ctx, server_hostname="localhost")
            with trio.fail_after(5):
                await stream.send_all(b"ping")
                assert await stream.receive_some(4) == b"ping"
            await trio.sleep((expires - dt.datetime.now(dt.UTC)).total_seconds() + 1.5)
            tunnel.replace_state(TunnelState.build(load_file(path)))
            tunnel.revalidate()
            got = await echo_or_closed(stream, b"pong")
            await trio.aclose_forcefully(stream)
    assert got == b"pong"
    assert not [r for r in caplog.records if r.getMessage().startswith("closing ")]
