"""File watching (tunnel.watch): what a snapshot notices, and when `watch` calls back.

Most `watch` tests run on trio's autojump clock: the watcher only sleeps and stats files, so
virtual time makes the timing exact (a write is never racing a poll) and the tests instant.
Writes always change a file's size, so the coarse mtime clock of the filesystem cannot hide
one. One test runs on the real clock to show the same thing works without the mock.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio
import trio.testing

from tests.kubelet import project
from tunnel.watch import snapshot, watch

INTERVAL = 0.1

# -- snapshot --------------------------------------------------------------------------------


def file_key(path: Path) -> str:
    return f"file:{path}"


def test_snapshot_sees_a_kubelet_data_swap_with_the_same_content_size(tmp_path: Path) -> None:
    """The kubelet swaps `..data`, never the user-visible symlinks: the change is in where
    they lead, and a renewed certificate is often the very same size."""
    volume = tmp_path / "certs"
    project(volume, {"tls.crt": b"A" * 600, "ca.crt": b"C" * 500})
    links = [volume / "tls.crt", volume / "ca.crt"]
    first = snapshot(links)
    link_before = os.lstat(volume / "tls.crt")

    project(volume, {"tls.crt": b"B" * 600, "ca.crt": b"C" * 500})

    assert os.lstat(volume / "tls.crt").st_ino == link_before.st_ino  # the link is untouched
    assert snapshot(links)[file_key(volume / "tls.crt")] != first[file_key(volume / "tls.crt")]


def test_snapshot_unchanged_when_nothing_changes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.pem"
    a.write_text("one")
    b.write_text("two")
    (tmp_path / "c.yaml").write_text("three")
    first = snapshot([a, b, tmp_path / "missing"], [tmp_path])
    a.read_text()  # reading is not changing

    assert snapshot([a, b, tmp_path / "missing"], [tmp_path]) == first
    assert set(first) == {file_key(a), file_key(b), file_key(tmp_path / "missing"), f"dir:{tmp_path}"}


def test_snapshot_sees_a_content_change(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("old")
    before = snapshot([path])

    path.write_text("new content")

    assert snapshot([path]) != before


def test_snapshot_sees_an_mtime_change_alone(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("same")
    before = snapshot([path])
    st = os.stat(path)

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    assert snapshot([path]) != before


def test_snapshot_sees_a_size_change_alone(tmp_path: Path) -> None:
    """Rewritten in place with the old mtime put back (cp -p, rsync -t --inplace)."""
    path = tmp_path / "cert.pem"
    path.write_text("short")
    before = snapshot([path])
    st = os.stat(path)

    path.write_text("longer content")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    assert os.stat(path).st_ino == st.st_ino
    assert snapshot([path]) != before


def test_snapshot_sees_a_file_replaced_with_same_size_and_mtime(tmp_path: Path) -> None:
    """An atomic rename (what pki and most tools do): only the inode tells."""
    path, tmp = tmp_path / "cert.pem", tmp_path / ".cert.pem.tmp"
    path.write_text("AAAA")
    st = os.stat(path)
    before = snapshot([path])
    tmp.write_text("BBBB")
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))

    os.replace(tmp, path)

    assert snapshot([path]) != before


def test_snapshot_follows_a_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes secret volumes swap a ..data symlink; the file name stays the same."""
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "tls.crt").write_text("CERT")
    data = tmp_path / "..data"
    data.symlink_to("v1")
    path = tmp_path / "tls.crt"
    path.symlink_to("..data/tls.crt")
    before = snapshot([path])
    for version in ("v1", "v2"):
        st = os.stat(tmp_path / "v1" / "tls.crt")
        os.utime(tmp_path / version / "tls.crt", ns=(st.st_atime_ns, st.st_mtime_ns))

    (tmp_path / "..data.new").symlink_to("v2")
    os.replace(tmp_path / "..data.new", data)

    assert path.read_text() == "CERT"
    assert snapshot([path]) != before


def test_snapshot_removed_file_is_none(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("key")
    before = snapshot([path])
    assert before[file_key(path)] is not None

    path.unlink()

    after = snapshot([path])
    assert after != before
    assert after[file_key(path)] is None
    assert snapshot([path]) == after

    path.write_text("key")
    assert snapshot([path]) != after


def test_snapshot_sees_yaml_files_added_to_a_directory(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("a")
    before = snapshot([], [tmp_path])

    (tmp_path / "notes.txt").write_text("not a tunnel")
    (tmp_path / "ca.crt").write_text("not a tunnel either")
    assert snapshot([], [tmp_path]) == before

    (tmp_path / "b.yaml").write_text("b")
    with_b = snapshot([], [tmp_path])
    assert with_b != before

    (tmp_path / "c.yml").write_text("c")
    with_c = snapshot([], [tmp_path])
    assert with_c != with_b

    (tmp_path / "b.yaml").unlink()
    assert snapshot([], [tmp_path]) not in (before, with_b, with_c)


def test_snapshot_missing_directory_is_none(tmp_path: Path) -> None:
    directory = tmp_path / "conf.d"
    assert snapshot([], [directory])[f"dir:{directory}"] is None
    directory.mkdir()
    assert snapshot([], [directory])[f"dir:{directory}"] is not None


# -- watch -----------------------------------------------------------------------------------


class Recorder:
    """An on_change that notes the (trio) time of each call and runs an optional action."""

    def __init__(self, action: Callable[[int], None] | None = None) -> None:
        self.times: list[float] = []
        self.action = action
        self.called = trio.Event()

    async def __call__(self) -> None:
        self.times.append(trio.current_time())
        if self.action is not None:
            self.action(len(self.times))
        self.called.set()


Sources = Callable[[], tuple[list[Path], list[Path]]]


def fixed(files: list[Path], directories: list[Path] | None = None) -> Sources:
    """Sources that return whatever the lists hold at the time of each call."""
    dirs = directories if directories is not None else []
    return lambda: (list(files), list(dirs))


@asynccontextmanager
async def watching(sources: Sources, on_change: Recorder, *, interval: float = INTERVAL) -> AsyncIterator[None]:
    """Run watch() until the block ends; the block starts after its first snapshot."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(watch, sources, on_change, interval=interval))
        await trio.testing.wait_all_tasks_blocked()
        yield
        nursery.cancel_scope.cancel()


def append(path: Path, data: str = "x") -> None:
    with path.open("a") as f:
        f.write(data)


async def test_watch_never_calls_when_nothing_changes(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("a")
    recorder = Recorder()
    async with watching(fixed([path], [tmp_path]), recorder):
        await trio.sleep(30 * INTERVAL)
    assert recorder.times == []


async def test_watch_calls_once_after_a_change(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("a")
    recorder = Recorder()
    async with watching(fixed([path]), recorder):
        await trio.sleep(2.5 * INTERVAL)
        changed_at = trio.current_time()
        append(path)
        await trio.sleep(30 * INTERVAL)

    assert len(recorder.times) == 1
    # Noticed at the next poll, then one more (half-interval) poll to see it settled.
    assert changed_at < recorder.times[0] <= changed_at + 1.5 * INTERVAL + 1e-9


async def test_watch_waits_until_the_file_stops_changing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "cert.pem"
    path.write_text("")
    contents: list[str] = []
    recorder = Recorder(lambda _: contents.append(path.read_text()))
    async with watching(fixed([path]), recorder):
        start = trio.current_time()
        # A write every 0.05 s for 0.5 s, half-way between the watcher's polls.
        for k in range(10):
            await trio.sleep_until(start + 0.025 + 0.05 * k)
            assert recorder.times == [], f"called while the file was still being written (write {k})"
            append(path)
        last_write = trio.current_time()
        await trio.sleep(30 * INTERVAL)

    assert len(recorder.times) == 1
    assert last_write < recorder.times[0] <= last_write + 1.5 * INTERVAL + 1e-9
    assert contents == ["x" * 10]  # on_change saw the finished file


async def test_watch_waits_until_the_file_stops_changing_on_the_real_clock(tmp_path: Path) -> None:
    """The same on the real clock. The writes keep to absolute times, 25 ms off the polls,
    so a poll late by less than that cannot make a quiet half-interval out of nothing."""
    path = tmp_path / "cert.pem"
    path.write_text("")
    recorder = Recorder()
    async with watching(fixed([path]), recorder):
        start = trio.current_time()
        for k in range(10):
            await trio.sleep_until(start + 0.025 + 0.05 * k)
            assert recorder.times == [], f"called while the file was still being written (write {k})"
            append(path)
        last_write = trio.current_time()
        with trio.fail_after(1):
            await recorder.called.wait()
        await trio.sleep(0.3)
    assert len(recorder.times) == 1
    assert recorder.times[0] > last_write


async def test_watch_on_the_real_clock(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("a")
    recorder = Recorder()
    async with watching(fixed([path]), recorder, interval=0.05):
        append(path)
        with trio.fail_after(1):
            await recorder.called.wait()
        await trio.sleep(0.3)
    assert len(recorder.times) == 1


async def test_watch_sees_a_removed_file(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "crl.pem"
    path.write_text("crl")
    recorder = Recorder()
    async with watching(fixed([path]), recorder):
        await trio.sleep(INTERVAL)
        path.unlink()
        await trio.sleep(10 * INTERVAL)
    assert len(recorder.times) == 1


async def test_watch_sees_a_yaml_file_added_to_a_directory(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    (tmp_path / "a.yaml").write_text("a")
    recorder = Recorder()
    async with watching(fixed([], [tmp_path]), recorder):
        await trio.sleep(INTERVAL)
        (tmp_path / "README.txt").write_text("ignored")
        await trio.sleep(10 * INTERVAL)
        assert recorder.times == []
        (tmp_path / "b.yaml").write_text("b")
        await trio.sleep(10 * INTERVAL)
    assert len(recorder.times) == 1


async def test_watch_picks_up_sources_named_after_a_change(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A reload may name new files (a new tls.crl, say): later polls must watch them too."""
    config, crl, unrelated = tmp_path / "a.yaml", tmp_path / "crl.pem", tmp_path / "other.pem"
    for path in (config, crl, unrelated):
        path.write_text("v1")
    files = [config]
    recorder = Recorder(lambda _: files.append(crl) if crl not in files else None)
    async with watching(fixed(files), recorder):
        await trio.sleep(INTERVAL)
        append(unrelated)
        append(crl)  # not watched yet
        await trio.sleep(10 * INTERVAL)
        assert recorder.times == []

        append(config)  # the "reload" adds crl.pem to the sources
        await trio.sleep(10 * INTERVAL)
        assert len(recorder.times) == 1
        assert files == [config, crl]

        append(crl)
        await trio.sleep(10 * INTERVAL)
    assert len(recorder.times) == 2


async def test_watch_calls_again_for_a_change_made_while_on_change_ran(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """cert-manager writes tls.crt, the reload starts, then tls.key lands: not to be lost."""
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    crt.write_text("crt v1")
    key.write_text("key v1")

    def during_first_reload(call: int) -> None:
        if call == 1:
            key.write_text("key v2 (longer)")

    recorder = Recorder(during_first_reload)
    async with watching(fixed([crt, key]), recorder):
        await trio.sleep(INTERVAL)
        crt.write_text("crt v2 (longer)")
        await trio.sleep(20 * INTERVAL)
    assert len(recorder.times) == 2
