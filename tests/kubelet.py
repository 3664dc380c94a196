"""Files laid out as the kubelet projects a Secret or ConfigMap volume, for tests.

The kubelet's AtomicWriter (kubernetes pkg/volume/util/atomic_writer.go) writes a volume
directory DIR so that a reader never sees a mix of old and new files:

    DIR/..2026_11_30_10_58_20.1234567/tls.crt    the files, in a timestamped directory (0755)
    DIR/..data -> ..2026_11_30_10_58_20.1234567  which a symlink names
    DIR/tls.crt -> ..data/tls.crt                 and one symlink per key, through ..data

An update writes a new timestamped directory, points a new symlink `..data_tmp` at it and
renames that over `..data` (rename(2) is atomic), then removes the old directory. The
files' own inodes and mtimes never change: only where `..data` leads.

Modes: each file gets the volume's `defaultMode` (0644 unless set). With a pod
`fsGroup`, the kubelet then chowns everything to that group and, the volume being
read-only, adds group read (0440) to files and group read+execute and setgid (02550) to
directories (pkg/volume/volume_linux.go, SetVolumeOwnership). DIR itself is the root of a
tmpfs: root-owned, mode 1777 (3777 with fsGroup).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

RO_GROUP_FILE = 0o440
RO_GROUP_DIR = 0o2550


def project(directory: Path, files: dict[str, bytes], *, mode: int = 0o644, fs_group: int | None = None) -> Path:
    """Write `files` (name: content) into `directory` as the kubelet does, replacing what
    an earlier call projected there. Returns the new timestamped directory."""
    directory.mkdir(exist_ok=True)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    new = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    new.chmod(0o755)
    for name, content in files.items():
        path = new / name
        path.write_bytes(content)
        path.chmod(mode)
    if fs_group is not None:
        for path in [new, *new.iterdir()]:
            os.chown(path, -1, fs_group)
            path.chmod(path.stat().st_mode | (RO_GROUP_DIR if path.is_dir() else RO_GROUP_FILE))
    tmp = directory / "..data_tmp"
    tmp.symlink_to(new.name)
    os.rename(tmp, data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(directory / old)
    return new
