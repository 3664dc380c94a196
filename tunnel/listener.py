"""Listening sockets: bind a listen address (TCP, or a unix socket file with its mode
and group), accept the next connection (surviving EMFILE), close and unlink."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Collection, Iterable
from typing import Any, Protocol

import trio

from tunnel.config import Address, UnixSocket
from tunnel.logs import event

_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class AcceptHealth(Protocol):
    """Where `accept` says that accept(2) keeps failing (for /healthz), and when it works again."""

    accept_failing: str | None


def bind_listener(address: Address, *, reuse_port: bool = False, unix: UnixSocket | None = None) -> socket.socket:
    """A listening, non-blocking socket for a listen address (OSError if it cannot bind).
    With reuse_port, several worker processes each bind the same TCP port (SO_REUSEPORT)
    and the kernel spreads new connections across them. A unix: socket file gets
    `unix.group` and `unix.mode` (default: the daemon's group, 0600) before it listens."""
    if address.path is not None:
        _remove_stale_unix_socket(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The socket file must never be more open than unix.mode, not even for a moment:
            # bind(2) creates it with 0777 & ~umask (unix(7)), and fchmod on the socket does
            # not reach the file. So bind under a umask that leaves 0600 at most, then chown
            # to unix.group, and only then chmod to unix.mode. The umask is per process, not
            # per thread: this is one system call on the trio thread, the only other threads
            # (getaddrinfo workers) create no files, and it can only ever narrow a mode.
            old_umask = os.umask(0o177)
            try:
                sock.bind(address.path)
            finally:
                os.umask(old_umask)
            try:
                set_unix_permissions(address.path, unix or UnixSocket())
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(address.path)
                raise
        except OSError:
            sock.close()
            raise
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address.host, address.port))
        except OSError:
            sock.close()
            raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def set_unix_permissions(path: str, unix: UnixSocket) -> None:
    """Give the socket file the group unix.group (None: the daemon's effective group), then
    the mode unix.mode: in that order, so the mode never opens it to the wrong group.
    chown(2) only where the group differs: a socket bound by a daemon whose own group is
    unix.group already has it, and the systemd unit's system call filter forbids chown.
    OSError naming the key if either fails (chown: only root, or a member of the group)."""
    gid = os.getegid() if unix.group is None else unix.group
    try:
        if os.stat(path).st_gid != gid:
            os.chown(path, -1, gid)
    except OSError as exc:
        hint = (
            " (only root or a member of the group may; under systemd/tunnel@.service, which filters"
            " out chown, make it the service's Group= instead)"
            if exc.errno == errno.EPERM
            else ""
        )
        raise OSError(exc.errno, f"unix.group: cannot give {path} group {gid}: {exc.strerror}{hint}") from exc
    try:
        os.chmod(path, unix.mode)
    except OSError as exc:
        raise OSError(exc.errno, f"unix.mode: cannot chmod {path} to {unix.mode:04o}: {exc.strerror}") from exc


def _remove_stale_unix_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full accept queue: EAGAIN now, not a wait for room
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left over from a previous run
    except OSError as exc:
        # EACCES (a mode that shuts us out), EAGAIN (a full accept queue): someone may be
        # listening. Never unlink a socket that might be alive.
        raise OSError(exc.errno, f"{path} exists and may be in use: {exc.strerror}") from exc
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
    finally:
        probe.close()


def close_listener(sock: socket.socket, address: Address) -> None:
    """Close a listening socket (telling trio first) and unlink a unix socket file."""
    if sock.fileno() == -1:
        return
    trio.lowlevel.notify_closing(sock)
    sock.close()
    if address.path is not None:
        with contextlib.suppress(OSError):
            os.unlink(address.path)


async def accept(listener: socket.socket, name: str, tunnel: AcceptHealth | None = None) -> tuple[socket.socket, Any]:
    """The next connection. Out of file descriptors or memory: log (not on every retry),
    wait 100 ms and try again; the connection waits in the kernel backlog meanwhile.
    `tunnel.accept_failing` says why while that lasts (for /healthz). Nothing yields once
    a socket is accepted: a cancellation never reaches the caller with a socket in hand,
    and the caller must give it to a task before it yields (and yield then, so that a
    flood of connections does not starve the rest)."""
    failures = 0
    while True:
        try:
            sock, address = listener.accept()
        except BlockingIOError:
            if tunnel is not None:  # it got as far as an empty queue: descriptors are back
                tunnel.accept_failing = None
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno in _ACCEPT_RETRY_ERRNOS:
                if failures % 50 == 0:
                    event(
                        logging.ERROR,
                        "accept_failed",
                        "accept failed tunnel=%s: %s; retrying every 100ms",
                        name,
                        exc.strerror,
                        tunnel=name,
                        reason=exc.strerror,
                    )
                failures += 1
                if tunnel is not None:
                    tunnel.accept_failing = exc.strerror or str(exc)
                await trio.sleep(0.1)
                continue
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue
            raise
        if failures:
            if tunnel is not None:
                tunnel.accept_failing = None
            event(
                logging.WARNING,
                "accept_recovered",
                "accept recovered tunnel=%s after %d retries",
                name,
                failures,
                tunnel=name,
            )
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # already reset by the peer: the handshake will tell
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # No checkpoint from accept(2) to the return: a cancellation (a stop) delivered here
        # would close a socket the client already sees connected, unread, which it sees as a
        # reset. The caller hands the socket to a task first, then yields.
        return sock, address


class Listeners:
    """The one owner of a process's listening sockets, keyed by listen address.

    Tunnels borrow a socket (`borrow`) and give it back (`give_back`): the first borrow of
    an address binds it, a second borrower of the same address gets the same socket (a
    tunnel renamed on reload, and later several tunnels on one address chosen by SNI),
    and the socket is closed (a unix socket file this registry made, unlinked) when the
    last borrower gives it back. A socket the process was handed already bound (a
    supervisor's, systemd's LISTEN_FDS) is `adopt`ed: served like the others, but its
    path is never unlinked, since someone else made it (and may hand it on again). One
    adopted with `keep` (systemd's) stays open when its last borrower gives it back: the
    service manager holds the address anyway, and a reload that brings a tunnel back to
    it serves it again.
    Workers bind their own SO_REUSEPORT sockets (`reuse_port`), one per worker.
    """

    def __init__(self, *, reuse_port: bool = False) -> None:
        self.reuse_port = reuse_port
        self._sockets: dict[Address, socket.socket] = {}
        self._borrowers: dict[Address, int] = {}
        self._adopted: set[Address] = set()
        self._kept: set[Address] = set()
        self._accepting: dict[Address, trio.Lock] = {}
        self._members: dict[Address, dict[str, Any]] = {}

    def join(self, address: Address, name: str, member: Any) -> None:
        """`member` (a tunnel) takes connections routed to it on `address` (by SNI)."""
        self._members.setdefault(address, {})[name] = member

    def leave(self, address: Address, name: str, member: Any) -> None:
        """`member` takes no more connections on `address` (if it is the one that joined)."""
        members = self._members.get(address, {})
        if members.get(name) is member:
            del members[name]
            if not members:
                self._members.pop(address, None)

    def members(self, address: Address) -> list[Any]:
        """The tunnels taking connections on `address` now, in the order they joined."""
        return list(self._members.get(address, {}).values())

    def accepting(self, address: Address) -> trio.Lock:
        """Held by whichever borrower is waiting in accept(2) on `address`: trio lets one
        task at a time wait for a descriptor, and while a reload hands an address from one
        tunnel to another (a renamed one) both accept loops run for a moment."""
        return self._accepting.setdefault(address, trio.Lock())

    def adopt(self, address: Address, sock: socket.socket, *, keep: bool = False, owned: bool = False) -> None:
        """Serve `sock`, already bound and listening, for `address` from now on. `keep`:
        keep it open while no tunnel borrows it, until the process ends (systemd's, which
        it owns). `owned`: this process now owns it as if it had bound it (handed over by
        the process it upgrades): a unix socket file is unlinked with it."""
        sock.setblocking(False)
        self._sockets[address] = sock
        self._borrowers.setdefault(address, 0)
        if not owned:
            self._adopted.add(address)
        if keep:
            self._kept.add(address)

    def adopted(self, address: Address) -> bool:
        """Was `address`'s socket handed to this process (rather than bound here)? Its
        unix socket file's mode and group are then whoever made it's to set."""
        return address in self._adopted

    def kept(self) -> set[Address]:
        """The addresses adopted with `keep`."""
        return set(self._kept)

    def items(self) -> list[tuple[Address, socket.socket]]:
        """Every listening socket held now, by address (what an upgrade hands over)."""
        return list(self._sockets.items())

    def keep_files(self) -> None:
        """Never unlink the socket files held now: they were handed over to a new process,
        which serves them on."""
        self._adopted.update(self._sockets)

    def discard(self, address: Address) -> None:
        """Close the socket of `address` if nobody borrowed it (one handed over for an
        address the configuration no longer has: connects must not queue where nobody
        accepts). A kept one (systemd's) stays."""
        if address in self._sockets and self._borrowers.get(address, 0) == 0 and address not in self._kept:
            self._borrowers[address] = 1
            self.give_back(address)

    def borrow(self, address: Address, unix: UnixSocket | None = None) -> socket.socket:
        """The listening socket for `address`, bound now if nobody holds it (OSError if it
        cannot be bound; nothing changes then)."""
        sock = self._sockets.get(address)
        if sock is None:
            sock = bind_listener(address, reuse_port=self.reuse_port, unix=unix)
            self._sockets[address] = sock
            self._borrowers[address] = 0
        self._borrowers[address] += 1
        return sock

    def give_back(self, address: Address) -> None:
        """One borrower is done with `address`; the last one closes it."""
        if address not in self._borrowers:
            return
        self._borrowers[address] -= 1
        if self._borrowers[address] > 0 or address in self._kept:
            return
        sock = self._sockets.pop(address)
        del self._borrowers[address]
        self._accepting.pop(address, None)
        if address in self._adopted:
            self._adopted.discard(address)
            if sock.fileno() != -1:
                trio.lowlevel.notify_closing(sock)
                sock.close()
        else:
            close_listener(sock, address)

    def __contains__(self, address: Address) -> bool:
        return address in self._sockets

    def borrowers(self, address: Address) -> int:
        """How many tunnels hold `address` now."""
        return self._borrowers.get(address, 0)


HANDED_DOWN = "TUNNEL_LISTEN_FDS"  # a supervisor's sockets for one worker: "FD=ADDRESS,..."
_KEEP = "/keep"  # "FD/keep=ADDRESS": adopt it with keep (a socket systemd passed)


def address_item(address: Address) -> str:
    """`address` as an item of a comma-separated list (HANDED_DOWN and its kin): "%" and ","
    percent-encoded, so that a unix: path with a comma in it survives the list."""
    return str(address).replace("%", "%25").replace(",", "%2C")


def address_of_item(item: str) -> Address:
    """The Address an `address_item` wrote. ValueError for a malformed one."""
    from urllib.parse import unquote

    from tunnel.config import parse_address

    return parse_address(unquote(item))


def fd_list(sockets: Iterable[tuple[Address, socket.socket]], kept: Collection[Address] = ()) -> str:
    """Inherited descriptors named for a child process: "FD=ADDRESS,...", and
    "FD/keep=ADDRESS" for the addresses in `kept` (sockets systemd passed, to be kept
    open while unused). An address may appear several times (a supervisor's, one per
    worker, in an upgrade)."""
    return ",".join(
        f"{sock.fileno()}{_KEEP if address in kept else ''}={address_item(address)}" for address, sock in sockets
    )


def parse_fd_list(value: str) -> list[tuple[Address, socket.socket, bool]]:
    """What `fd_list` wrote: (address, socket, kept) in its order. A descriptor named twice
    (a socket systemd passed, which every worker shares) is one socket object, so closing
    it once closes it. ValueError for a malformed value."""
    found = []
    made: dict[int, socket.socket] = {}
    for item in filter(None, value.split(",")):
        fd, _, address = item.partition("=")
        number = int(fd.removesuffix(_KEEP))
        if number not in made:
            made[number] = socket.socket(fileno=number)
        found.append((address_of_item(address), made[number], fd.endswith(_KEEP)))
    return found


def handed_down(sockets: dict[Address, socket.socket], kept: Collection[Address] = ()) -> str:
    """The value of HANDED_DOWN that tells a worker which inherited descriptor serves
    which listen address (and which of them to keep open while unused: `kept`)."""
    return fd_list(sockets.items(), kept)


def adopt_handed_down(listeners: Listeners, value: str) -> None:
    """Adopt the sockets a supervisor handed down (HANDED_DOWN's value) into `listeners`.
    ValueError for a malformed value."""
    for address, sock, keep in parse_fd_list(value):
        listeners.adopt(address, sock, keep=keep)
