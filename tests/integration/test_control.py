"""The process shell of tunnel/control.py, run in this process with real signals and real
files: what SIGHUP, SIGTERM/SIGINT and a changed file do, and what it logs.

Signals go to this very process, only while the shell's signal receiver is open."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tunnel import control
from tunnel.config import TunnelConfig
from tunnel.control import ControlLoop
from tunnel.status import Responder


class Shell(ControlLoop):
    """A process with nothing to serve: it records what the shell asks of it."""

    def __init__(self, paths: list[Path], *, worker: bool = False, watch_interval: float = 0) -> None:
        super().__init__(
            paths, status=(), status_configs=[], watch_interval=watch_interval, ignore_duplicate_stop=worker
        )
        self.calls: list[str] = []
        self.done = trio.Event()

    def _configs(self) -> list[TunnelConfig]:
        return []

    def _responder(self) -> Responder:
        async def respond(path: str) -> tuple[str, str, bytes]:
            return "404 Not Found", "text/plain", b""

        return respond

    async def _start(self, serving: trio.Nursery, helpers: trio.Nursery) -> dict[str, Any]:
        serving.start_soon(self.done.wait)
        return {"nothing": None}

    def _count(self) -> int:
        return 0

    async def reload(self) -> None:
        self.calls.append("reload")

    def _stop(self, signum: int) -> None:
        self._begin_stopping()
        self.calls.append(f"stop {signal.Signals(signum).name}")

    def _close_all(self, signum: int) -> None:
        self.calls.append(f"close_all {signal.Signals(signum).name}")
        self.done.set()


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 (a signal's effect: no event to wait for)
            await trio.sleep(0.01)


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str | None]]:
    """The named events logged (tunnel/logs.py `event`), each with its reason."""
    found = []
    for record in caplog.records:
        name = getattr(record, "event", "message")
        if name != "message":
            found.append((name, getattr(record, "fields", {}).get("reason")))
    return found


async def test_sighup_reloads_a_stop_signal_drains_and_a_second_one_closes_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    shell = Shell([])
    async with trio.open_nursery() as nursery:
        assert await nursery.start(shell.run) == {"nothing": None}
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: shell.calls == ["reload"])
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: len(shell.calls) == 2)
        os.kill(os.getpid(), signal.SIGINT)
    assert shell.calls == ["reload", "stop SIGTERM", "close_all SIGINT"]
    assert events(caplog) == [
        ("ready", None),
        ("reloading", "SIGHUP"),
        ("stopping", "SIGTERM"),
        ("closing_all", "SIGINT"),
        ("stopped", None),
    ]


async def test_no_reload_once_stopping_is_left_to_the_process(tmp_path: Path) -> None:
    """The shell passes every SIGHUP on: refusing a reload while stopping is the
    process's reload's rule (Daemon.reload, Supervisor.reload)."""
    shell = Shell([])
    async with trio.open_nursery() as nursery:
        await nursery.start(shell.run)
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: shell.calls == ["stop SIGTERM"])
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: shell.calls == ["stop SIGTERM", "reload"])
        shell.done.set()


async def test_a_worker_takes_the_same_stop_twice_within_the_window_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "DUPLICATE_WINDOW", 0.5)
    shell = Shell([], worker=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(shell.run)
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: shell.calls == ["stop SIGTERM"])
        os.kill(os.getpid(), signal.SIGTERM)  # the service manager's copy of the same stop
        await trio.sleep(0.2)
        assert shell.calls == ["stop SIGTERM"]
        await trio.sleep(0.4)
        os.kill(os.getpid(), signal.SIGTERM)  # a second stop, past the window
        await until(lambda: shell.calls == ["stop SIGTERM", "close_all SIGTERM"])


async def test_a_process_that_is_not_a_worker_takes_a_quick_second_stop_as_close_all() -> None:
    shell = Shell([])
    async with trio.open_nursery() as nursery:
        await nursery.start(shell.run)
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: shell.calls == ["stop SIGTERM"])
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: shell.calls == ["stop SIGTERM", "close_all SIGTERM"])


async def test_a_file_changed_right_after_ready_is_reloaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    path = tmp_path / "edge.yaml"
    path.write_text("name: edge\n")
    shell = Shell([path], watch_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(shell.run)
        path.write_text("name: edge  # changed, and longer\n")  # the watcher's first picture is older
        await until(lambda: shell.calls == ["reload"])
        shell.done.set()
    assert ("reloading", "file changed") in events(caplog)
