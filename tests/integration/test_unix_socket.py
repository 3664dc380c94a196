"""unix: listen sockets: the socket file's mode and group, and which local processes
(SO_PEERCRED) may use the tunnel. Real sockets and real uids: the tests run as root and
connect as `nobody` from a child process that drops to uid 65534 first."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import (
    PKI,
    Backend,
    backend,
    client_doc,
    echo,
    read_until_closed,
    running_tunnel,
    server_doc,
    write_yaml,
)
from tunnel.config import Address, UnixSocket, load_paths
from tunnel.daemon import Daemon, build_states
from tunnel.listener import bind_listener
from tunnel.metrics import PrometheusMetrics
from tunnel.state import TunnelState
from tunnel.tunnel import Tunnel

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to connect as other uids")

# Connect to the unix socket argv[1] as uid argv[2], gid argv[3], supplementary groups
# argv[4] (comma separated), send b"ping", half-close, and print what came back ("got: ..."),
# "closed" if the connection ended with nothing, or why it could not connect: a real
# process with real credentials, as SO_PEERCRED sees them.
AS_ANOTHER_USER = r"""
import os, socket, sys
path, uid, gid, groups = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.setgroups([int(g) for g in groups.split(",") if g])
os.setgid(gid)
os.setuid(uid)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(path)
except OSError as exc:
    print("cannot connect: " + type(exc).__name__)
    sys.exit()
got = b""
try:
    s.sendall(b"ping")
    s.shutdown(socket.SHUT_WR)
    while chunk := s.recv(65536):
        got += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
print("got: " + got.decode() if got else "closed")
"""


async def connect_as(path: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> str:
    """What a process with these credentials gets back for b"ping" through `path`."""
    result = await trio.run_process(
        [sys.executable, "-c", AS_ANOTHER_USER, str(path), str(uid), str(gid), ",".join(map(str, groups))],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return str(result.stdout.decode().strip())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that uid 65534 can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="tunnel-unix-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@asynccontextmanager
async def client_over_unix(
    p: PKI, tmp: Path, sock: Path, unix: dict[str, Any] | None, *, target: str | None = None
) -> AsyncIterator[tuple[Tunnel, Backend]]:
    """echo backend ← server tunnel (TCP, TLS) ← client tunnel listening on unix:`sock`.
    With `target`, the client tunnel dials that instead (no server tunnel)."""
    async with backend(echo) as target_backend:
        extra: dict[str, Any] = {"unix": unix} if unix is not None else {}
        if target is not None:
            doc = client_doc(p, target, listen=f"unix:{sock}", **extra)
            async with running_tunnel(write_yaml(tmp / "client.yaml", doc)) as (client, _):
                yield client, target_backend
            return
        server = write_yaml(tmp / "server.yaml", server_doc(p, target_backend.address))
        async with running_tunnel(server) as (_, server_address):
            doc = client_doc(p, server_address, listen=f"unix:{sock}", **extra)
            async with running_tunnel(write_yaml(tmp / "client.yaml", doc)) as (client, _):
                yield client, target_backend


async def ping(path: Path) -> bytes:
    """b"ping" through the socket as this (root) process; what came back (b"" if refused)."""
    async with await trio.open_unix_socket(str(path)) as stream:
        try:
            await stream.send_all(b"ping")
            await stream.send_eof()
        except trio.BrokenResourceError:
            return b""  # refused (reset) before the ping went out: EPIPE (seen in CI)
        with trio.fail_after(10):
            return await read_until_closed(stream)


def mode_and_gid(path: Path) -> tuple[int, int]:
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode), st.st_gid


# -- the socket file ---------------------------------------------------------------------


@pytest.mark.usefixtures("umask_000")
async def test_a_unix_listen_socket_is_0600_by_default_even_under_umask_000(pki_files: PKI, tmp_path: Path) -> None:
    sock = tmp_path / "app.sock"
    async with client_over_unix(pki_files, tmp_path, sock, None):
        assert mode_and_gid(sock) == (0o600, os.getegid())


@pytest.mark.usefixtures("umask_000")
async def test_unix_mode_and_group_are_applied_to_the_socket_file(pki_files: PKI, tmp_path: Path) -> None:
    sock = tmp_path / "app.sock"
    async with client_over_unix(pki_files, tmp_path, sock, {"mode": "0660", "group": "nogroup"}):
        assert mode_and_gid(sock) == (0o660, NOBODY)


async def test_the_socket_file_mode_admits_another_user_only_when_it_says_so(
    pki_files: PKI, tmp_path: Path, shared_dir: Path
) -> None:
    """The mode is what lets another service in: 0600 keeps nobody out, 0660 with its
    group lets it in, and bytes flow through the whole chain."""
    sock = shared_dir / "app.sock"
    async with client_over_unix(pki_files, tmp_path, sock, None):
        assert await connect_as(sock, NOBODY, NOBODY) == "cannot connect: PermissionError"
    async with client_over_unix(pki_files, tmp_path, sock, {"mode": "0660", "group": NOBODY}):
        assert await connect_as(sock, NOBODY, NOBODY) == "got: ping"


# -- allow_users / allow_groups ----------------------------------------------------------


async def test_an_allowed_user_gets_through_and_bytes_flow(pki_files: PKI, tmp_path: Path) -> None:
    sock = tmp_path / "app.sock"
    async with client_over_unix(pki_files, tmp_path, sock, {"allow_users": ["root"]}):
        assert await ping(sock) == b"ping"


async def test_a_user_not_in_allow_users_is_refused_and_the_target_never_dialled(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    sock = tmp_path / "app.sock"
    async with backend(echo) as target:
        doc = client_doc(pki_files, target.address, listen=f"unix:{sock}", unix={"allow_users": ["nobody"]})
        state = TunnelState.build(load_paths([write_yaml(tmp_path / "client.yaml", doc)])[0])
        tunnels: list[Tunnel] = []
        metrics = PrometheusMetrics(lambda: tunnels)
        tunnel = Tunnel(state, metrics)
        tunnels.append(tunnel)
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.serve)
            assert await ping(sock) == b""
            await trio.sleep(0.2)  # time for a dial, were one made
            tunnel.abort()
        assert target.accepted == 0
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert len(refused) == 1
    assert refused[0].startswith("refused: unix peer not allowed: uid 0 gid 0 pid ")
    assert refused[0].endswith("is not in unix.allow_users tunnel=client peer=unix")
    assert 'tunnel_connections_refused_total{reason="unix peer not allowed",tunnel="client"} 1.0' in (
        metrics.text().decode()
    )
    assert not any(r.getMessage().startswith("opened") for r in caplog.records)


async def test_another_uid_is_admitted_by_allow_users_and_refused_without_it(
    pki_files: PKI, tmp_path: Path, shared_dir: Path
) -> None:
    sock = shared_dir / "app.sock"
    unix: dict[str, Any] = {"mode": "0666", "allow_users": ["nobody"]}
    async with client_over_unix(pki_files, tmp_path, sock, unix) as (_, target):
        assert await connect_as(sock, NOBODY, NOBODY) == "got: ping"
        assert await ping(sock) == b""  # root is not nobody
        assert target.accepted == 1
    unix = {"mode": "0666", "allow_users": [0]}
    async with client_over_unix(pki_files, tmp_path, sock, unix, target="127.0.0.1:1") as (_, target):
        assert await connect_as(sock, NOBODY, NOBODY) == "closed"


@pytest.mark.parametrize(
    ("allow_groups", "groups", "admitted"),
    [
        pytest.param(["nogroup"], (), True, id="primary-gid"),
        pytest.param([4242], (4242,), True, id="supplementary-group"),
        pytest.param([4242, "4243"], (7, 4243), True, id="one-of-several"),
        pytest.param([4242], (4243,), False, id="no-match"),
        pytest.param([0], (), False, id="root-group-but-not-root"),
    ],
)
async def test_allow_groups_matches_the_peer_process_gid_or_supplementary_groups(
    pki_files: PKI,
    tmp_path: Path,
    shared_dir: Path,
    allow_groups: list[object],
    groups: tuple[int, ...],
    admitted: bool,
) -> None:
    sock = shared_dir / "app.sock"
    unix = {"mode": "0666", "allow_groups": allow_groups}
    async with client_over_unix(pki_files, tmp_path, sock, unix) as (_, target):
        assert await connect_as(sock, NOBODY, NOBODY, groups) == ("got: ping" if admitted else "closed")
        assert target.accepted == (1 if admitted else 0)


async def test_allow_users_or_allow_groups_either_admits(pki_files: PKI, tmp_path: Path, shared_dir: Path) -> None:
    sock = shared_dir / "app.sock"
    unix = {"mode": "0666", "allow_users": ["root"], "allow_groups": [4242]}
    async with client_over_unix(pki_files, tmp_path, sock, unix) as (_, target):
        assert await ping(sock) == b"ping"
        assert await connect_as(sock, NOBODY, NOBODY, (4242,)) == "got: ping"
        assert await connect_as(sock, NOBODY, NOBODY) == "closed"
        assert target.accepted == 2


async def test_a_server_tunnel_on_unix_checks_allow_users_before_the_handshake(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    sock = tmp_path / "tls.sock"
    async with backend(echo) as target:
        doc = server_doc(pki_files, target.address, listen=f"unix:{sock}", unix={"allow_users": ["nobody"]})
        async with running_tunnel(write_yaml(tmp_path / "server.yaml", doc)):
            # Not even a ClientHello: the refusal comes before any TLS.
            assert await ping(sock) == b""
        assert target.accepted == 0
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
    assert len(refused) == 1
    assert "is not in unix.allow_users" in refused[0]


# -- reload ------------------------------------------------------------------------------


async def test_a_reload_applies_new_mode_group_and_allow_users_to_the_same_socket(
    pki_files: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    sock = tmp_path / "app.sock"
    async with backend(echo) as target:
        server = write_yaml(tmp_path / "server.yaml", server_doc(pki_files, target.address))
        async with running_tunnel(server) as (_, server_address):
            path = tmp_path / "conf" / "client.yaml"
            path.parent.mkdir()
            doc = client_doc(pki_files, server_address, listen=f"unix:{sock}", unix={"allow_users": ["root"]})
            write_yaml(path, doc)
            daemon = Daemon([path], build_states(load_paths([path])), watch_interval=0)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                assert mode_and_gid(sock) == (0o600, os.getegid())
                inode = sock.stat().st_ino
                open_stream = await trio.open_unix_socket(str(sock))
                await open_stream.send_all(b"x")
                with trio.fail_after(5):
                    assert await open_stream.receive_some() == b"x"

                doc["unix"] = {"mode": "0660", "group": "nogroup", "allow_users": ["nobody"]}
                write_yaml(path, doc)
                assert await daemon.reload()
                assert sock.stat().st_ino == inode, "the same socket, not a new one"
                assert mode_and_gid(sock) == (0o660, NOBODY)
                assert await ping(sock) == b"", "root is no longer allowed"
                with trio.fail_after(5):  # and its open connection is cut
                    with contextlib.suppress(trio.BrokenResourceError):
                        assert await open_stream.receive_some() == b""
                await open_stream.aclose()

                del doc["unix"]  # back to the defaults: the daemon's group, 0600, anyone
                write_yaml(path, doc)
                assert await daemon.reload()
                assert mode_and_gid(sock) == (0o600, os.getegid())
                assert await ping(sock) == b"ping"
                daemon.stop()
    assert any(
        "closing tunnel=client" in r.getMessage() and "unix.allow_users" in r.getMessage() for r in caplog.records
    )


def test_a_live_socket_with_a_full_accept_queue_is_not_taken_for_a_stale_one(pki_files: PKI, tmp_path: Path) -> None:
    """Only ECONNREFUSED means nobody listens: a busy listener's socket file must not be
    unlinked (and the probe must not wait for room in its queue)."""
    sock = tmp_path / "busy.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(sock))
    busy.listen(0)
    queued = []
    try:
        while True:  # fill the accept queue
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            queued.append(filler)
            try:
                filler.connect(str(sock))
            except BlockingIOError:
                break
        path = write_yaml(tmp_path / "client.yaml", client_doc(pki_files, "127.0.0.1:1", listen=f"unix:{sock}"))
        tunnel = Tunnel(TunnelState.build(load_paths([path])[0]))
        outcome: list[BaseException | None] = []

        def bind() -> None:
            try:
                tunnel.bind()
                outcome.append(None)
            except OSError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=bind, daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive(), "the probe waited for room in the busy listener's queue"
        assert isinstance(outcome[0], OSError)
        assert "may be in use" in str(outcome[0])
        assert sock.exists()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        with pytest.raises(BlockingIOError), probe:  # still the busy listener's file
            probe.connect(str(sock))
    finally:
        for filler in queued:
            filler.close()
        busy.close()


def test_a_group_the_daemon_cannot_give_is_an_error_naming_unix_group(shared_dir: Path) -> None:
    """A daemon that is not root (a forked child that drops to nobody) cannot chown the
    socket to a group it is not in: the error names unix.group, and no socket file is left
    behind with the wrong group."""
    os.chown(shared_dir, NOBODY, NOBODY)
    sock = shared_dir / "s.sock"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                bind_listener(Address(path=str(sock)), unix=UnixSocket(mode=0o660, group=0)).close()
                report = "bound"
            except OSError as exc:
                report = f"{exc.strerror}"
            os.write(write_end, report.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    os.waitpid(pid, 0)
    assert report.startswith(f"unix.group: cannot give {sock} group 0: Operation not permitted (only root")
    assert not sock.exists()
