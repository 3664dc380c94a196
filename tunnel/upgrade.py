"""The hand-over upgrade: SIGUSR2 (or `tunnel upgrade`) replaces a running `tunnel run`
with a new process started from the same command line (so newly installed code runs),
without refusing a connect or dropping a connection.

The old process (a single daemon, or the supervisor of `--workers N`):

1. starts `restart_command()` with every listening socket inherited (the tunnels'
   sockets, all workers' SO_REUSEPORT sockets, the status addresses': see `handover`),
   plus one end of a private channel (a unix SOCK_SEQPACKET socket pair);
2. waits at most READY_TIMEOUT seconds for the new process to say READY=1 on that
   channel, once every listener of its own accepts (both accept from the same sockets
   meanwhile: nothing is closed, so no connect is refused);
3. answers GO, stops accepting and drains its open connections as on SIGTERM, and exits;
   it neither closes a socket the new process holds nor unlinks a unix: socket file.

If the new process cannot be started, exits, or is not ready in time, the old one kills
it, logs `upgrade_failed` with the reason, and goes on serving.

The new process (`TakeOver.from_environ`) adopts the sockets, starts as usual, says
READY=1 on the channel, waits for GO (or for the channel to close: the old process is
gone), and only then tells systemd `MAINPID=<its pid>` and `READY=1` (sd_notify(3);
the unit needs NotifyAccess=all, since the message comes from a process that is not yet
the main one).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import trio

from tunnel.config import Address
from tunnel.listener import HANDED_DOWN, fd_list, parse_fd_list
from tunnel.ticket_keys import PassedSecret, pass_secret

UPGRADE_CHANNEL = "TUNNEL_UPGRADE_FD"  # the new process's end of the private readiness channel
HANDED_STATUS = "TUNNEL_STATUS_FDS"  # the status addresses' sockets: "FD=ADDRESS,..."
READY_TIMEOUT = 30.0  # seconds the new process has to report ready
READY = b"READY=1"
GO = b"GO"


def restart_command(argv: Sequence[str] | None = None, executable: str | None = None) -> list[str]:
    """The command line that starts this program again, as it was started
    (`sys.orig_argv`: interpreter options and `-m tunnel.cli` included). A console
    script (`/usr/local/bin/tunnel run ...`) is run by its own `#!` line when it is
    executable, so that a reinstalled virtualenv's interpreter runs the new code;
    otherwise the running interpreter runs the same arguments."""
    argv = list(sys.orig_argv if argv is None else argv)
    executable = executable or sys.executable
    rest = argv[1:]
    if rest and not rest[0].startswith("-") and os.path.isfile(rest[0]) and os.access(rest[0], os.X_OK):
        return rest
    return [executable, *rest]


@dataclass
class Handover:
    """What the new process inherits: environment variables and descriptors (pass_fds)."""

    env: dict[str, str] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)


def handover(
    listening: Sequence[tuple[Address, socket.socket]],
    status: Sequence[tuple[Address, socket.socket]],
    channel: socket.socket,
    kept: Collection[Address] = (),
    secret: PassedSecret | None = None,
) -> Handover:
    """Everything the old process passes to the new one: the one place to add state that
    must survive an upgrade (an inherited descriptor in `fds`, named in `env`).

    `listening`: the tunnels' sockets (HANDED_DOWN, "FD=ADDRESS,..."; an address appears
    once per worker with `--workers N`, in worker order); `status`: the status addresses'
    sockets (HANDED_STATUS); `channel`: the new process's end of the readiness channel
    (UPGRADE_CHANNEL); `kept`: the addresses whose sockets systemd passed (marked FD/keep in HANDED_DOWN:
    the new process keeps them open and never unlinks their files either); `secret`: the
    session tickets' master secret through a pipe (tunnel/ticket_keys.py), so sessions
    resume across the upgrade."""
    env = {
        HANDED_DOWN: fd_list(listening, kept),
        HANDED_STATUS: fd_list(status),
        UPGRADE_CHANNEL: str(channel.fileno()),
    }
    fds = [sock.fileno() for _, sock in [*listening, *status]] + [channel.fileno()]
    if secret is not None:
        env.update(secret.env)
        fds.append(secret.fd)
    return Handover(env=env, fds=fds)


@dataclass
class TakeOver:
    """The new process's side: what the old one handed over."""

    listening: list[tuple[Address, socket.socket]]
    status: dict[Address, list[socket.socket]]
    channel: socket.socket
    kept: set[Address] = field(default_factory=set)  # systemd's sockets (marked /keep)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> TakeOver | None:
        """The hand-over this process was started with (its variables removed from the
        environment, so that no worker inherits them), or None for an ordinary start.
        ValueError for malformed values."""
        environ = os.environ if environ is None else environ
        fd = environ.pop(UPGRADE_CHANNEL, None)
        listening = environ.pop(HANDED_DOWN, "")
        status_value = environ.pop(HANDED_STATUS, "")
        if fd is None:
            return None
        status: dict[Address, list[socket.socket]] = {}
        for address, sock, _ in parse_fd_list(status_value):
            status.setdefault(address, []).append(sock)
        channel = socket.socket(fileno=int(fd))
        handed = parse_fd_list(listening)
        return cls(
            listening=[(address, sock) for address, sock, _ in handed],
            status=status,
            channel=channel,
            kept={address for address, _, keep in handed if keep},
        )

    def addresses(self) -> set[Address]:
        """The tunnel addresses handed over."""
        return {address for address, _ in self.listening}

    def by_address(self) -> dict[Address, list[socket.socket]]:
        """The tunnel sockets per address, in the order handed (worker 0 first)."""
        grouped: dict[Address, list[socket.socket]] = {}
        for address, sock in self.listening:
            grouped.setdefault(address, []).append(sock)
        return grouped

    async def ready(self) -> None:
        """Tell the old process READY=1 and wait for its GO (or for the channel to close:
        the old process is gone, and this one serves alone anyway). An old process that
        gave up on this one kills it instead of answering."""
        sock = trio.socket.from_stdlib_socket(self.channel)
        with contextlib.suppress(OSError):
            await sock.send(READY)
            while await sock.recv(64) not in (GO, b""):
                pass
        sock.close()


async def start_new_process(
    listening: Sequence[tuple[Address, socket.socket]],
    status: Sequence[tuple[Address, socket.socket]],
    *,
    kept: Collection[Address] = (),
    ready_within: float = READY_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> tuple[trio.Process | None, str]:
    """Start the new process with the hand-over and wait until it is ready: (the process,
    "") once it reported READY=1 and was answered GO; (None, why) if it could not be
    started, exited, or was not ready within `ready_within` seconds (it has been killed)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = trio.socket.from_stdlib_socket(ours)
    try:
        secret = pass_secret()
        given = handover(listening, status, theirs, kept, secret)
        try:
            process = await trio.lowlevel.open_process(
                restart_command(), env={**(os.environ if env is None else env), **given.env}, pass_fds=given.fds
            )
        except OSError as exc:
            return None, f"cannot start {restart_command()[0]}: {exc.strerror or exc}"
        finally:
            theirs.close()
            secret.close()
        try:
            return await _wait_ready(process, channel, ready_within)
        except BaseException:  # cancelled (the old process closing everything): no orphan
            process.kill()
            raise
    finally:
        channel.close()


async def _wait_ready(
    process: trio.Process, channel: trio.socket.SocketType, ready_within: float
) -> tuple[trio.Process | None, str]:
    why = ""
    with trio.move_on_after(ready_within) as waiting:
        message = await channel.recv(64)
        if message == READY:
            await channel.send(GO)
            return process, ""
        # The channel closed: the new process is ending. How?
        with trio.move_on_after(5):
            code = await process.wait()
            why = f"the new process exited with status {_status(code)} before it was ready"
        why = why or "the new process closed its readiness channel"
    if waiting.cancelled_caught:
        why = f"the new process was not ready within {ready_within:g}s"
    if process.returncode is None:
        process.kill()
    with trio.CancelScope(shield=True):
        await process.wait()
    return None, why


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{-code} ({signal.Signals(-code).name})"
    return str(code)
