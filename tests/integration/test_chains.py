"""Certificates from intermediate CAs (what step-ca, Vault and cert-manager issue): both
layouts, `check`, reload in the middle of a connection, revoked leaves and intermediates,
and resumed sessions judged as a full handshake would judge them."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import (
    backend,
    echo,
    make_sub_ca,
    running_tunnel,
    write_crl,
    write_yaml,
)
from tunnel import pki
from tunnel.config import ConfigError, load_file
from tunnel.state import TunnelState
from tunnel.trust import check_certificates, load_trust
from tunnel.tunnel import Tunnel


@dataclass(frozen=True)
class Chains:
    """root → issuing (by `tunnel ca init --parent`) → server, app1, app2; and
    root → mid → deep → app3 (two intermediates)."""

    root: Path
    issuing: Path
    deep: Path

    @property
    def root_crt(self) -> Path:
        return self.root / "ca.crt"


@pytest.fixture
def chains(tmp_path: Path) -> Chains:
    root, issuing = tmp_path / "root", tmp_path / "issuing"
    pki.init_ca(root, name="Example root CA")
    pki.init_ca(issuing, name="Example issuing CA", parent=root)
    pki.issue(issuing, "server", kind="server", dns=["localhost"], ips=["127.0.0.1"])
    pki.issue(issuing, "app1", kind="client")
    pki.issue(issuing, "app2", kind="client")
    mid = make_sub_ca(root, tmp_path / "mid", "Example mid CA", path_length=1)
    deep = make_sub_ca(mid, tmp_path / "deep", "Example deep CA", path_length=0)
    pki.issue(deep, "app3", kind="client", days=30)
    return Chains(root=root, issuing=issuing, deep=deep)


def leaf_only(crt: Path, out: Path) -> Path:
    """The first certificate of a chain file: the leaf alone."""
    text = crt.read_text()
    end = "-----END CERTIFICATE-----\n"
    out.write_text(text[: text.index(end) + len(end)])
    return out


def server_yaml(c: Chains, tmp: Path, target: str, **tls: Any) -> Path:
    doc: dict[str, Any] = {
        "mode": "server",
        "listen": "127.0.0.1:0",
        "target": target,
        "tls": {"cert": str(c.issuing / "server.crt"), "key": str(c.issuing / "server.key"), "ca": str(c.root_crt)},
        "allow": {"cn": ["app1", "app2", "app3"]},
        "limits": {"handshake_timeout": "2s"},
    }
    doc["tls"].update(tls)
    return write_yaml(tmp / "server.yaml", doc)


def client_context(c: Chains, crt: Path, key: Path, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(c.root_crt))
    ctx.load_cert_chain(crt, key)
    ctx.maximum_version = version
    return ctx


async def connect(ctx: ssl.SSLContext, address: str) -> trio.SSLStream[trio.SocketStream]:
    host, _, port = address.rpartition(":")
    stream = trio.SSLStream(await trio.open_tcp_stream(host, int(port)), ctx, server_hostname="localhost")
    await stream.do_handshake()
    return stream


async def ping(stream: trio.SSLStream[trio.SocketStream]) -> bytes:
    """Send and read back 4 bytes through an echo target; b"" if the tunnel closed or reset."""
    with trio.fail_after(5):
        try:
            await stream.send_all(b"ping")
            return bytes(await stream.receive_some(4))
        except trio.BrokenResourceError:
            return b""


def reload(tunnel: Tunnel, path: Path) -> None:
    tunnel.replace_state(TunnelState.build(load_file(path)))
    tunnel.revalidate()


# -- check: the tunnel's own chain -------------------------------------------------------------


def test_check_accepts_intermediates_after_the_leaf_with_only_the_root_in_tls_ca(
    chains: Chains, tmp_path: Path
) -> None:
    config = load_file(server_yaml(chains, tmp_path, "127.0.0.1:9"))
    assert check_certificates(config) == []
    TunnelState.build(config)


def test_check_accepts_intermediates_in_the_tls_ca_bundle(chains: Chains, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(chains.root_crt.read_bytes() + (chains.issuing / "ca.crt").read_bytes())
    leaf = leaf_only(chains.issuing / "server.crt", tmp_path / "server-leaf.crt")
    config = load_file(server_yaml(chains, tmp_path, "127.0.0.1:9", cert=str(leaf), ca=str(bundle)))
    assert check_certificates(config) == []
    TunnelState.build(config)


def test_check_refuses_a_leaf_whose_intermediate_is_nowhere(chains: Chains, tmp_path: Path) -> None:
    leaf = leaf_only(chains.issuing / "server.crt", tmp_path / "server-leaf.crt")
    config = load_file(server_yaml(chains, tmp_path, "127.0.0.1:9", cert=str(leaf)))
    with pytest.raises(ConfigError, match="does not chain to a CA in") as info:
        check_certificates(config)
    assert info.value.key == "tls.cert"
    assert "intermediates after the certificate" in info.value.message


def test_check_refuses_a_ca_bundle_without_a_root(chains: Chains, tmp_path: Path) -> None:
    config = load_file(server_yaml(chains, tmp_path, "127.0.0.1:9", ca=str(chains.issuing / "ca.crt")))
    with pytest.raises(ConfigError, match="no self-signed") as info:
        load_trust(config)
    assert info.value.key == "tls.ca"


def test_tls_crl_needs_a_crl_from_every_ca_in_tls_ca(chains: Chains, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(chains.root_crt.read_bytes() + (chains.issuing / "ca.crt").read_bytes())
    config = load_file(server_yaml(chains, tmp_path, "127.0.0.1:9", ca=str(bundle), crl=str(chains.root / "crl.pem")))
    with pytest.raises(ConfigError, match="no CRL from the CA 'CN=Example issuing CA'") as info:
        load_trust(config)
    assert info.value.key == "tls.crl"
    both = [str(chains.root / "crl.pem"), str(chains.issuing / "crl.pem")]
    load_trust(load_file(server_yaml(chains, tmp_path, "127.0.0.1:9", ca=str(bundle), crl=both)))


# -- peers with chains ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["chain-in-cert", "intermediate-in-ca"])
async def test_a_client_with_an_intermediate_gets_through_in_both_layouts(
    chains: Chains, tmp_path: Path, layout: str
) -> None:
    tls: dict[str, str] = {}
    crt = chains.issuing / "app1.crt"
    if layout == "intermediate-in-ca":
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(chains.root_crt.read_bytes() + (chains.issuing / "ca.crt").read_bytes())
        tls["ca"] = str(bundle)
        crt = leaf_only(crt, tmp_path / "app1-leaf.crt")
    async with backend(echo) as target:
        async with running_tunnel(server_yaml(chains, tmp_path, target.address, **tls)) as (_, address):
            stream = await connect(client_context(chains, crt, chains.issuing / "app1.key"), address)
            assert await ping(stream) == b"ping"
            await stream.aclose()


async def test_a_client_two_intermediates_deep_gets_through(chains: Chains, tmp_path: Path) -> None:
    async with backend(echo) as target:
        async with running_tunnel(server_yaml(chains, tmp_path, target.address)) as (_, address):
            stream = await connect(client_context(chains, chains.deep / "app3.crt", chains.deep / "app3.key"), address)
            assert await ping(stream) == b"ping"
            await stream.aclose()


@pytest.mark.parametrize("name", ["app1", "app3"])
async def test_a_reload_keeps_a_client_that_presented_its_intermediates(
    chains: Chains, tmp_path: Path, name: str
) -> None:
    """The reload re-check builds a path from the chain the client presented, as the
    handshake did, instead of asking whether the root signed the leaf directly."""
    directory = chains.issuing if name == "app1" else chains.deep
    async with backend(echo) as target:
        path = server_yaml(chains, tmp_path, target.address)
        async with running_tunnel(path) as (tunnel, address):
            stream = await connect(
                client_context(chains, directory / f"{name}.crt", directory / f"{name}.key"), address
            )
            assert await ping(stream) == b"ping"
            reload(tunnel, path)
            reload(tunnel, path)
            assert await ping(stream) == b"ping"
            await stream.aclose()


async def test_a_revoked_intermediate_closes_open_connections_and_refuses_new_ones(
    chains: Chains, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    crls = [str(chains.root / "crl.pem"), str(chains.issuing / "crl.pem")]
    ctx = client_context(chains, chains.issuing / "app1.crt", chains.issuing / "app1.key")
    async with backend(echo) as target:
        path = server_yaml(chains, tmp_path, target.address, crl=crls)
        async with running_tunnel(path) as (tunnel, address):
            stream = await connect(ctx, address)
            assert await ping(stream) == b"ping"

            pki.revoke(chains.root, "issuing")  # init --parent left root/issuing.crt for this
            reload(tunnel, path)

            assert await ping(stream) == b""
            again = await connect(ctx, address)  # TLS 1.3: the refusal follows the handshake
            assert await ping(again) == b""
            for closed in (stream, again):
                await trio.aclose_forcefully(closed)
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closing ")]
    assert closing
    assert "revoked (its CA CN=Example issuing CA)" in closing[0]
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert refused
    assert refused[0].startswith("refused: revoked")


async def test_a_leaf_revoked_by_its_intermediate_is_cut_on_reload(chains: Chains, tmp_path: Path) -> None:
    crls = [str(chains.root / "crl.pem"), str(chains.issuing / "crl.pem")]
    async with backend(echo) as target:
        path = server_yaml(chains, tmp_path, target.address, crl=crls)
        async with running_tunnel(path) as (tunnel, address):
            app1 = await connect(
                client_context(chains, chains.issuing / "app1.crt", chains.issuing / "app1.key"), address
            )
            app2 = await connect(
                client_context(chains, chains.issuing / "app2.crt", chains.issuing / "app2.key"), address
            )
            assert await ping(app1) == b"ping"
            assert await ping(app2) == b"ping"

            pki.revoke(chains.issuing, "app2")
            reload(tunnel, path)

            assert await ping(app2) == b""
            assert await ping(app1) == b"ping"
            await app1.aclose()
            await trio.aclose_forcefully(app2)


# -- a client tunnel whose server has an intermediate ------------------------------------------


async def test_a_client_tunnel_reaches_a_server_with_an_intermediate_and_keeps_it_on_reload(
    chains: Chains, tmp_path: Path
) -> None:
    async with backend(echo) as target:
        async with running_tunnel(server_yaml(chains, tmp_path, target.address)) as (_, server_address):
            doc = {
                "mode": "client",
                "listen": "127.0.0.1:0",
                "target": server_address,
                "tls": {
                    "cert": str(chains.issuing / "app1.crt"),
                    "key": str(chains.issuing / "app1.key"),
                    "ca": str(chains.root_crt),
                    "server_name": "localhost",
                },
            }
            path = write_yaml(tmp_path / "client.yaml", doc)
            async with running_tunnel(path) as (client_tunnel, address):
                host, _, port = address.rpartition(":")
                stream = await trio.open_tcp_stream(host, int(port))
                with trio.fail_after(5):
                    await stream.send_all(b"ping")
                    assert await stream.receive_some(4) == b"ping"
                    reload(client_tunnel, path)
                    await stream.send_all(b"pong")
                    assert await stream.receive_some(4) == b"pong"
                await stream.aclose()


# -- resumption: every check of a full handshake -------------------------------------------------


def _blocking_session(
    ctx: ssl.SSLContext, address: str, session: ssl.SSLSession | None
) -> tuple[bool | None, bytes, Any]:
    """One stdlib TLS connection offering `session`: (resumed?, the echo of b"hi", the
    session to offer next). A clean close keeps the server's session cached."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        try:
            tls.sendall(b"hi")
            data = tls.recv(10)
        except OSError:
            data = b""
        resumed, next_session = tls.session_reused, tls.session
        if data:
            tls.unwrap()
        tls.close()
    return resumed, data, next_session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_resumed_session_is_refused_once_the_crl_is_stale(
    chains: Chains, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: ssl.TLSVersion
) -> None:
    """OpenSSL refuses full handshakes once tls.crl passes its next update, but a
    resumption skips certificate checks: the tunnel makes them itself."""
    caplog.set_level(logging.INFO, logger="tunnel")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    stale_at = now + dt.timedelta(seconds=3)
    issuing_crl = write_crl(chains.issuing, tmp_path / "issuing.crl", last_update=now, next_update=stale_at)
    crls = [str(chains.root / "crl.pem"), str(issuing_crl)]
    ctx = client_context(chains, chains.issuing / "app1.crt", chains.issuing / "app1.key", version)
    async with backend(echo) as target:
        async with running_tunnel(server_yaml(chains, tmp_path, target.address, crl=crls)) as (_, address):
            resumed, data, session = await trio.to_thread.run_sync(_blocking_session, ctx, address, None)
            assert (resumed, data) == (False, b"hi")
            resumed, data, session = await trio.to_thread.run_sync(_blocking_session, ctx, address, session)
            assert (resumed, data) == (True, b"hi")  # resumption works while the CRL is current

            await trio.sleep((stale_at - dt.datetime.now(dt.UTC)).total_seconds() + 0.5)
            resumed, data, _ = await trio.to_thread.run_sync(_blocking_session, ctx, address, session)
            assert resumed  # so only the tunnel's own check can refuse it
            assert data == b""
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert len(refused) == 1, refused
    assert refused[0].startswith("refused: CRL expired")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_ticket_from_another_worker_whose_leaf_alone_has_no_path_makes_a_full_handshake(
    chains: Chains, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: ssl.TLSVersion
) -> None:
    """Two tunnels from one file, as two workers: same keys, their own records. app1
    presents its issuing CA, which tls.ca (the root alone) lacks. Worker B never saw its
    full handshake, and from the leaf alone it would find no path and refuse a client
    that a full handshake admits: it declines the ticket instead (a full handshake), and
    resumes the next one."""
    caplog.set_level(logging.INFO, logger="tunnel")
    ctx = client_context(chains, chains.issuing / "app1.crt", chains.issuing / "app1.key", version)
    async with backend(echo) as target:
        path = server_yaml(chains, tmp_path, target.address)
        async with running_tunnel(path) as (_, worker_a), running_tunnel(path) as (_, worker_b):
            resumed, data, session = await trio.to_thread.run_sync(_blocking_session, ctx, worker_a, None)
            assert (resumed, data) == (False, b"hi")
            resumed, data, session = await trio.to_thread.run_sync(_blocking_session, ctx, worker_b, session)
            assert (resumed, data) == (False, b"hi")  # declined: a full handshake, not a refusal
            resumed, data, session = await trio.to_thread.run_sync(_blocking_session, ctx, worker_b, session)
            assert (resumed, data) == (True, b"hi")  # now B has its full handshake's verdict
            resumed, data, _ = await trio.to_thread.run_sync(_blocking_session, ctx, worker_a, session)
            assert (resumed, data) == (True, b"hi")
    assert not [r for r in caplog.records if r.getMessage().startswith("refused:")]


async def test_a_ticket_from_another_worker_resumes_when_the_leaf_has_a_path_through_tls_ca(
    chains: Chains, tmp_path: Path
) -> None:
    """With the issuing CA in tls.ca the leaf alone has a path: worker B resumes A's
    ticket at once, and judges it (a revoked leaf would be refused: see below)."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(chains.root_crt.read_bytes() + (chains.issuing / "ca.crt").read_bytes())
    ctx = client_context(
        chains, leaf_only(chains.issuing / "app1.crt", tmp_path / "app1.crt"), chains.issuing / "app1.key"
    )
    async with backend(echo) as target:
        path = server_yaml(chains, tmp_path, target.address, ca=str(bundle))
        async with running_tunnel(path) as (_, worker_a), running_tunnel(path) as (_, worker_b):
            resumed, data, session = await trio.to_thread.run_sync(_blocking_session, ctx, worker_a, None)
            assert (resumed, data) == (False, b"hi")
            resumed, data, session = await trio.to_thread.run_sync(_blocking_session, ctx, worker_b, session)
            assert (resumed, data) == (True, b"hi")
