"""Who is at the other end of an accepted unix socket (SO_PEERCRED, SO_PEERGROUPS), and
whether `unix.allow_users` / `unix.allow_groups` admit that process."""

from __future__ import annotations

import platform
import socket
import struct
import sys
from dataclasses import dataclass

from tunnel.config import UnixSocket
from tunnel.outcomes import Outcome, refusal


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a unix socket, as the kernel recorded it at connect(2)."""

    pid: int
    uid: int
    gid: int  # effective gid
    groups: tuple[int, ...] | None  # supplementary gids; None where the kernel cannot say


# SO_PEERGROUPS (Linux 4.13+, socket(7)): the peer's supplementary groups at connect(2).
# Python does not name it. 59 is its number in asm-generic/socket.h, which these use;
# alpha, mips, parisc and sparc number it otherwise and go without (primary gid only).
_SO_PEERGROUPS: int | None = getattr(socket, "SO_PEERGROUPS", None)
if _SO_PEERGROUPS is None and sys.platform == "linux":
    machine = platform.machine()
    if machine in {"x86_64", "aarch64", "riscv64", "s390x", "ppc64le", "ppc64", "loongarch64"} or (
        machine.startswith(("arm", "i386", "i486", "i586", "i686"))
    ):
        _SO_PEERGROUPS = 59


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED (struct ucred: pid, uid, gid; socket(7), unix(7)) of an accepted unix
    socket, and its SO_PEERGROUPS. At most 256 supplementary groups are read (Python's
    getsockopt buffer limit); past that, or on an older kernel, `groups` is None."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    groups: tuple[int, ...] | None = None
    if _SO_PEERGROUPS is not None:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        except OSError:  # ERANGE: more than 256 groups; ENOPROTOOPT: before Linux 4.13
            pass
        else:
            groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return PeerCredentials(pid=pid, uid=uid & 0xFFFFFFFF, gid=gid & 0xFFFFFFFF, groups=groups)


def unix_peer_refusal(peer: PeerCredentials, unix: UnixSocket) -> Outcome | None:
    """Why `unix.allow_users` / `unix.allow_groups` refuse this peer process, or None if
    one of them admits it (any one match admits). A group matches the peer's effective gid
    or one of its supplementary groups: the process's own credentials, as the kernel checks
    file permissions, not the user database."""
    if unix.allow_users is not None and peer.uid in unix.allow_users:
        return None
    if unix.allow_groups is not None and (
        peer.gid in unix.allow_groups or not unix.allow_groups.isdisjoint(peer.groups or ())
    ):
        return None
    if unix.allow_users is None:
        where = "is not in unix.allow_groups"
    elif unix.allow_groups is None:
        where = "is not in unix.allow_users"
    else:
        where = "is in neither unix.allow_users nor unix.allow_groups"
    return refusal("unix peer not allowed", f"uid {peer.uid} gid {peer.gid} pid {peer.pid} {where}")
