"""Notice when any file the daemon was configured from changes: poll, let it settle, report.

Polling (stat every file and list every directory once a second) works the same on every
filesystem, including the bind mounts and symlink swaps Kubernetes, Vault Agent and
cert-manager use, and costs a few system calls per file per second.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import trio

Snapshot = dict[str, object]

DEFAULT_INTERVAL = 1.0


def snapshot(files: Iterable[Path], directories: Iterable[Path] = ()) -> Snapshot:
    """What each file looks like now (mtime, size, inode; None if missing), and which
    tunnel files each directory holds."""
    state: Snapshot = {}
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            state[f"file:{path}"] = None
        else:
            state[f"file:{path}"] = (st.st_mtime_ns, st.st_size, st.st_ino)
    for directory in directories:
        try:
            names = sorted(entry.name for entry in os.scandir(directory) if entry.name.endswith((".yaml", ".yml")))
        except OSError:
            state[f"dir:{directory}"] = None
        else:
            state[f"dir:{directory}"] = tuple(names)
    return state


async def watch(
    sources: Callable[[], tuple[list[Path], list[Path]]],
    on_change: Callable[[], Awaitable[object]],
    *,
    interval: float = DEFAULT_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call `on_change` after the watched files change and then stay unchanged for one more
    poll (so a file being written is not read half-way). `sources` is asked again after
    every call, since a reload may name new files. Reports started once it has the files'
    first picture: a change after that is seen. Runs until cancelled."""
    last = snapshot(*sources())
    task_status.started()
    while True:
        await trio.sleep(interval)
        current = snapshot(*sources())
        if current == last:
            continue
        while True:  # settle
            await trio.sleep(interval / 2)
            again = snapshot(*sources())
            if again == current:
                break
            current = again
        await on_change()
        # Compare later polls with the state on_change was called for, not with the files as
        # they are now: a change made while on_change ran must cause another call. Only files
        # that sources() names for the first time are taken as they are now.
        last = {key: current.get(key, state) for key, state in snapshot(*sources()).items()}
