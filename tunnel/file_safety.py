"""Whether the files a tunnel trusts could have been changed by someone else.

A tunnel trusts its CA, CRL, certificate and key files (and the tunnel file naming them)
as they are on disk, and reloads them by itself when they change. So anyone who can write
one of them, or replace it through a directory above it, can make the tunnel admit their
own certificates. The rules are those OpenSSH applies to its keys and the paths to them
(sshd(8), "StrictModes"; ssh(1) on identity files):

* no such file, and no directory above it up to the root, may be writable by anyone but
  its owner (no group or other write bit); a root-owned directory with the sticky bit,
  such as /tmp, is safe, since there nobody may replace another's entries;
* a private key (and the file holding its password) may not be readable by every user;
  readable by its group stays allowed: the shipped systemd unit and container image hand
  keys to the service through a group.

Both the path as written and the path its symbolic links resolve to are checked, since
either chain of directories could be used to swap the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeFile(Exception):
    """A file, or a directory above it, that others could change (or read, for a key)."""


def check_file(path: Path, *, secret: bool = False) -> None:
    """UnsafeFile naming the file or directory and its mode if `path` (absolute) could be
    changed by anyone but its owner (or, with `secret`, read by every user)."""
    real = Path(os.path.realpath(path))
    info = os.stat(real)
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFile(
            f"{_named(path, real)} is writable by {_who(info.st_mode)} (mode {_mode(info)}): chmod go-w it"
        )
    if secret and info.st_mode & stat.S_IROTH:
        raise UnsafeFile(
            f"{_named(path, real)} is readable by every user (mode {_mode(info)}): "
            "chmod 600 it (or 640 to share it with a group)"
        )
    for directory in dict.fromkeys([*_parents(Path(os.path.abspath(path))), *_parents(real)]):
        info = os.stat(directory)
        if not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            continue
        if info.st_mode & stat.S_ISVTX and info.st_uid == 0:
            continue  # like /tmp: nobody may replace what another user put there
        raise UnsafeFile(
            f"{path} is in {directory}, which is writable by {_who(info.st_mode)} (mode {_mode(info)}): "
            "anyone who can write it can replace the file; chmod go-w it"
        )


def _parents(path: Path) -> list[Path]:
    return list(path.parents)


def _named(path: Path, real: Path) -> str:
    return str(path) if real == path else f"{path} (that is {real})"


def _who(mode: int) -> str:
    return "every user" if mode & stat.S_IWOTH else "its group"


def _mode(info: os.stat_result) -> str:
    return f"{stat.S_IMODE(info.st_mode):04o}"
