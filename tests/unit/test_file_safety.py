"""file_safety: which trust files, and which directories above them, others could change."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kubelet import project
from tunnel.file_safety import UnsafeFile, check_file

NOBODY = 65534


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A private directory (pytest's tmp_path is 0700 under /tmp, root-owned and sticky)."""
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    yield directory
    for path in [directory, *directory.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def make(path: Path, mode: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    path.chmod(mode)
    return path


@pytest.mark.parametrize(("mode", "secret"), [(0o644, False), (0o600, True), (0o640, True), (0o444, False)])
def test_files_only_their_owner_can_change_are_safe(home: Path, mode: int, secret: bool) -> None:
    check_file(make(home / "ca.crt", mode), secret=secret)


@pytest.mark.parametrize(("mode", "who"), [(0o664, "its group"), (0o646, "every user"), (0o666, "every user")])
def test_a_file_others_can_write_is_unsafe(home: Path, mode: int, who: str) -> None:
    path = make(home / "ca.crt", mode)
    with pytest.raises(UnsafeFile, match=f"is writable by {who} \\(mode {mode:04o}\\)"):
        check_file(path)


def test_a_key_every_user_can_read_is_unsafe_but_its_group_may(home: Path) -> None:
    check_file(make(home / "k.key", 0o640), secret=True)
    with pytest.raises(UnsafeFile, match="readable by every user \\(mode 0644\\)"):
        check_file(make(home / "k.key", 0o644), secret=True)


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_a_directory_above_that_others_can_write_is_unsafe(home: Path, mode: int) -> None:
    path = make(home / "certs" / "ca.crt", 0o644)
    (home / "certs").chmod(mode)
    with pytest.raises(UnsafeFile, match=f"is in {home / 'certs'}, which is writable"):
        check_file(path)
    (home / "certs").chmod(0o755)
    home.chmod(mode)  # two levels up is as bad
    with pytest.raises(UnsafeFile, match=f"is in {home}, which is writable"):
        check_file(path)


def test_a_root_owned_sticky_directory_is_safe_and_another_owners_is_not(home: Path) -> None:
    path = make(home / "shared" / "ca.crt", 0o644)
    (home / "shared").chmod(0o1777)
    check_file(path)  # root-owned and sticky, like /tmp
    os.chown(home / "shared", NOBODY, -1)
    with pytest.raises(UnsafeFile, match="which is writable by every user \\(mode 1777\\)"):
        check_file(path)


def test_a_symlink_is_judged_by_where_it_leads_too(home: Path) -> None:
    """Kubernetes mounts secrets as links into a ..data directory: either chain of
    directories could be used to swap the file."""
    target = make(home / "writable" / "ca.crt", 0o644)
    (home / "writable").chmod(0o777)
    link = home / "certs" / "ca.crt"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(UnsafeFile, match="which is writable by every user"):
        check_file(link)
    (home / "writable").chmod(0o755)
    check_file(link)
    target.chmod(0o666)
    with pytest.raises(UnsafeFile, match=f"{link} \\(that is {target}\\) is writable by every user"):
        check_file(link)


# -- Kubernetes volumes (deploy/kubernetes/): what the kubelet really writes ----------------


def cert_manager_secret() -> dict[str, bytes]:
    return {"tls.crt": b"cert", "tls.key": b"key", "ca.crt": b"ca"}


@pytest.mark.skipif(os.geteuid() != 0, reason="the kubelet's files are root's: needs root to lay them out")
@pytest.mark.parametrize("fs_group", [None, NOBODY])
def test_a_secret_volume_with_default_mode_0440_is_safe(home: Path, fs_group: int | None) -> None:
    """deploy/kubernetes/: defaultMode 0440 and fsGroup, the kubelet adding group read
    (and setgid on directories); the volume's root a root-owned tmpfs, 1777 (3777 with fsGroup)."""
    volume = home / "certs"
    timestamped = project(volume, cert_manager_secret(), mode=0o440, fs_group=fs_group)
    volume.chmod(0o3777 if fs_group is not None else 0o1777)
    if fs_group is not None:
        os.chown(volume, 0, fs_group)
        assert f"{timestamped.stat().st_mode & 0o7777:04o}" == "2755"
    for name in ("tls.crt", "ca.crt"):
        check_file(volume / name)
    check_file(volume / "tls.key", secret=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the kubelet's files are root's: needs root to lay them out")
def test_a_secret_volume_with_the_default_mode_0644_exposes_the_key(home: Path) -> None:
    """Without defaultMode the kubelet writes 0644: every user of the container could read
    the key, and the tunnel says so, naming the link and the file it leads to."""
    volume = home / "certs"
    timestamped = project(volume, cert_manager_secret(), fs_group=NOBODY)
    volume.chmod(0o3777)
    check_file(volume / "tls.crt")
    with pytest.raises(UnsafeFile, match=f"that is {timestamped / 'tls.key'}\\) is readable by every user"):
        check_file(volume / "tls.key", secret=True)
