"""systemd socket activation: the listening sockets a service manager passed in
LISTEN_FDS / LISTEN_FDNAMES (sd_listen_fds(3), sd_listen_fds_with_names(3)), and which
tunnel each one serves.

systemd keeps a socket unit's sockets open itself, so while the daemon restarts (or is
upgraded) the kernel queues new connections on them instead of refusing them; the next
daemon accepts them. A tunnel whose socket was passed serves it instead of binding its
`listen` address; every other tunnel binds as usual.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from tunnel.config import Address, TunnelConfig, format_sockaddr
from tunnel.logs import event

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first passed descriptor
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """Sockets passed by systemd that cannot be served as they are (a configuration error:
    `tunnel run` exits 2)."""


@dataclass(frozen=True)
class Passed:
    """One passed descriptor: its number, its name (FileDescriptorName=, systemd.socket(5);
    "unknown" when LISTEN_FDNAMES is unset, as sd_listen_fds_with_names(3) says) and the
    socket on it."""

    fd: int
    name: str
    sock: socket.socket

    def describe(self) -> str:
        """`fd 3 (name "redis", address 127.0.0.1:6380)`, for errors and logs."""
        return f'fd {self.fd} (name "{self.name}", address {format_sockaddr(self.sock.getsockname())})'


def listen_fds(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> list[Passed]:
    """The sockets passed to this process, as sd_listen_fds(unset_environment=1) and
    sd_listen_fds_with_names(3) find them: LISTEN_FDS descriptors from
    SD_LISTEN_FDS_START (3) on, only if LISTEN_PID is this process's id (`pid`, default
    os.getpid()); none if LISTEN_PID is unset or another process's (the variables were
    meant for it). The three variables are removed from `environ` (default os.environ)
    in every case, so that no child inherits them, and each descriptor gets FD_CLOEXEC.

    ActivationError for a malformed variable, a descriptor that is not open or not a
    socket, or one that is not a listening stream socket (SO_ACCEPTCONN, SOCK_STREAM:
    a socket unit's ListenStream=)."""
    env = os.environ if environ is None else environ
    values = {name: env.pop(name, None) for name in VARIABLES}
    listen_pid, count_text, names_text = values["LISTEN_PID"], values["LISTEN_FDS"], values["LISTEN_FDNAMES"]
    if listen_pid is None:
        return []
    if not (listen_pid.isascii() and listen_pid.isdigit()):
        raise ActivationError(f"LISTEN_PID={listen_pid!r}: expected a process id (sd_listen_fds(3))")
    if int(listen_pid) != (os.getpid() if pid is None else pid):
        return []  # meant for another process (sd_listen_fds(3) ignores them too)
    if count_text is None or not (count_text.isascii() and count_text.isdigit()):
        raise ActivationError(f"LISTEN_FDS={count_text!r}: expected a number of descriptors (sd_listen_fds(3))")
    count = int(count_text)
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES={names_text!r} names {len(names)} descriptors, LISTEN_FDS passes {count}"
        )
    passed = []
    for fd, name in zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count), names, strict=True):
        try:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(
                f'LISTEN_FDS passed fd {fd} (name "{name}"), which is not an open socket: {exc.strerror or exc}'
            ) from None
        item = Passed(fd, name, sock)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            kind = "not a stream socket" if sock.type != socket.SOCK_STREAM else "not listening"
            raise ActivationError(
                f"LISTEN_FDS passed {item.describe()}, which is {kind}: a tunnel serves a listening"
                " stream socket (a socket unit's ListenStream=, with Accept=no)"
            )
        passed.append(item)
    return passed


def claim(passed: Sequence[Passed], configs: Sequence[TunnelConfig]) -> dict[Address, Passed]:
    """Which passed socket serves which listen address: the one named (FileDescriptorName=)
    after a tunnel serves that tunnel's `listen`; any other, the tunnel whose `listen` is
    the socket's own address (a unix socket: the same path). Tunnels sharing an address
    (`sni`) share its socket. ActivationError for a socket no tunnel claims, or two
    sockets for one address."""
    by_name = {config.name: config for config in configs}
    claimed: dict[Address, Passed] = {}
    for item in passed:
        config = by_name.get(item.name)
        if config is None:
            actual = _address(item.sock)
            config = next((c for c in configs if _same_address(c.listen, actual)), None)
        if config is None:
            raise ActivationError(
                f"LISTEN_FDS passed {item.describe()}, which no tunnel claims: no tunnel is named"
                f' "{item.name}" (FileDescriptorName=) or listens on its address'
            )
        other = claimed.get(config.listen)
        if other is not None:
            raise ActivationError(
                f"LISTEN_FDS passed both {other.describe()} and {item.describe()} for tunnel"
                f" {config.name} (listen {config.listen}): a listen address takes one socket"
            )
        claimed[config.listen] = item
        if not _same_address(config.listen, _address(item.sock)):
            event(
                logging.WARNING,
                "socket_address_differs",
                "tunnel %s serves the socket passed as %s, not its listen address %s",
                config.name,
                item.describe(),
                config.listen,
                tunnel=config.name,
                fd=item.fd,
                listen=str(config.listen),
            )
    return claimed


def announce(claimed: Mapping[Address, Passed], configs: Sequence[TunnelConfig]) -> None:
    """Log which tunnels serve a passed socket (instead of binding their listen address)."""
    for address, item in claimed.items():
        names = ",".join(c.name for c in configs if c.listen == address)
        event(
            logging.INFO,
            "socket_activated",
            "tunnel=%s serves the socket passed by the service manager: %s",
            names,
            item.describe(),
            tunnel=names,
            fd=item.fd,
            fd_name=item.name,
        )


def _address(sock: socket.socket) -> Address:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        path = name.decode(errors="replace") if isinstance(name, bytes) else name
        return Address(path=path)
    return Address(host=name[0], port=name[1])


def _same_address(listen: Address, actual: Address) -> bool:
    """Is `actual` (a bound socket's address) the `listen` address of a tunnel file? The
    same IP address (a host name: one it resolves to) and port; the same unix path."""
    if listen.path is not None or actual.path is not None:
        if listen.path is None or not actual.path:
            return False
        return os.path.realpath(listen.path) == os.path.realpath(actual.path)
    if listen.port != actual.port:
        return False
    try:
        return ipaddress.ip_address(listen.host) == ipaddress.ip_address(actual.host)
    except ValueError:
        pass
    with contextlib.suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM):
            if ipaddress.ip_address(sockaddr[0]) == ipaddress.ip_address(actual.host):
                return True
    return False
