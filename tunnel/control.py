"""One tunnel process's control loop: signals, file changes, readiness.

`tunnel run` runs as one of two kinds of process, each a `ControlLoop`: a `Daemon`
(tunnel/daemon.py: the tunnels themselves, alone or as one of several workers) or, with
`--workers N`, the `Supervisor` (tunnel/workers.py: the worker processes). What they share
is here; each supplies what differs: what it starts, how it reloads, stops and closes
everything, and how its status address answers.

* Start: the status addresses first (one that cannot be served is an error before any
  tunnel says it is listening), then the tunnels or workers, then the file watcher (its
  first picture of the files is taken before "ready": no change is missed), then
  `ready` is logged and sd_notify READY=1 sent.
* SIGHUP, or a change to a file the configuration came from: `reloading` (reason
  `SIGHUP` / `file changed`), then the process's reload, between sd_notify RELOADING=1
  and READY=1 (systemd.service(5), Type=notify-reload).
* SIGTERM or SIGINT: `stopping`, sd_notify STOPPING=1, stop accepting and drain; a second
  one: `closing_all`, close everything now.
* SIGUSR2: the hand-over upgrade (tunnel/upgrade.py): `upgrading`, a new process from the
  same command line gets every listening socket; once it is ready (`upgraded`) this one
  stops accepting and drains as on SIGTERM, but without STOPPING=1 (the service goes on,
  in the new process); if it is not (`upgrade_failed`) this one goes on serving. A
  SIGUSR2 during an upgrade, or while stopping, is ignored (`upgrade_ignored`). Workers
  ignore SIGUSR2: their supervisor is what is upgraded. A worker ignores the same stop reaching it
  twice within DUPLICATE_WINDOW seconds (from the service manager, which signals the
  whole control group, and from its supervisor, which passes it on).
* When everything has stopped: `stopped`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from tunnel.config import Address, TunnelConfig, status_addresses, status_origin, watched_files
from tunnel.logs import event
from tunnel.notify import Notifier
from tunnel.status import Responder, start_status
from tunnel.upgrade import READY_TIMEOUT, TakeOver, start_new_process
from tunnel.watch import DEFAULT_INTERVAL, watch

DUPLICATE_WINDOW = 1.0  # seconds in which a worker treats a repeated stop signal as the same one
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)

_T = TypeVar("_T")


class ControlLoop(ABC):
    """The shell of one `tunnel run` process (see the module docstring). Subclasses set
    `counted` (what the readiness line counts: "tunnels", "workers") and the notes the
    stop events carry, and implement the abstract methods."""

    counted = "tunnels"
    upgradable = True  # SIGUSR2 starts a hand-over upgrade (not in a worker)
    stopping_note = "no new connections; draining open ones"
    closing_note = "closing every connection now"

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        status: Sequence[Address],
        status_configs: Sequence[TunnelConfig],
        watch_interval: float = DEFAULT_INTERVAL,
        notifier: Notifier | None = None,
        ignore_duplicate_stop: bool = False,
        takeover: TakeOver | None = None,
        pidfile: Path | None = None,
    ) -> None:
        """`status`: the --status addresses given; `status_configs`: the configurations
        whose `status:` keys are served too; `watch_interval`: seconds between polls of
        the configuration's files, 0 for none; `ignore_duplicate_stop`: a worker's rule;
        `takeover`: what an upgrading process handed this one (tunnel/upgrade.py);
        `pidfile`: where to write this process's pid once ready (removed at exit)."""
        self.paths = list(paths)
        self.watch_interval = watch_interval
        self.notifier = notifier or Notifier()
        self.status_addresses = status_addresses(status, status_configs)
        self._given_status = list(status)
        self._ignore_duplicate_stop = ignore_duplicate_stop
        self._stopping = False
        self._stop_time = 0.0
        self._helpers: trio.Nursery | None = None
        self.takeover = takeover
        self.pidfile = pidfile
        self._pidfile_handed_over = False
        self._upgrading = False
        self._upgrade_scope: trio.CancelScope | None = None
        # The status addresses' listening sockets (handed over in an upgrade).
        self._status_sockets: dict[Address, list[socket.socket]] = dict(takeover.status) if takeover else {}

    # -- what each kind of process supplies --------------------------------------------

    @abstractmethod
    def _configs(self) -> list[TunnelConfig]:
        """The configuration in force: which files to watch, where a status address came from."""

    @abstractmethod
    def _responder(self) -> Responder:
        """What answers the status addresses."""

    def _prepare(self) -> None:  # noqa: B027 (a hook: most processes need nothing)
        """Before anything runs (and before signals are caught); errors end `run`."""

    @abstractmethod
    async def _start(self, serving: trio.Nursery, helpers: trio.Nursery) -> dict[str, Any]:
        """Start the tunnels or workers in `serving` (background tasks they need in
        `helpers`); return once they serve, with their addresses (name → address)."""

    def _running(self, helpers: trio.Nursery) -> None:  # noqa: B027 (a hook)
        """Start what runs only once ready (in `helpers`, cancelled at the end)."""

    @abstractmethod
    def _count(self) -> int:
        """How many tunnels or workers serve now."""

    @abstractmethod
    async def reload(self) -> object:
        """Reload everything (SIGHUP, or a configuration file changed)."""

    @abstractmethod
    def _stop(self, signum: int) -> None:
        """The first SIGTERM/SIGINT: stop accepting and drain (call `_begin_stopping`)."""

    @abstractmethod
    def _close_all(self, signum: int) -> None:
        """A second SIGTERM/SIGINT: close everything now."""

    def _listening(self) -> list[tuple[Address, socket.socket]]:
        """Every listening socket of the tunnels, for a hand-over upgrade."""
        return []

    def _kept(self) -> set[Address]:
        """The listen addresses whose sockets systemd passed (tunnel/activation.py): an
        upgrade's new process keeps them as this one does."""
        return set()

    def _handed_over(self) -> None:  # noqa: B027 (a hook)
        """The new process has taken over: stop accepting and drain, as `_stop` does but
        without telling the service manager (call `_begin_stopping(notify=False)`), and
        leave every unix: socket file in place."""

    # -- the shell ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stopped. Reports the addresses (name → address; `status ADDRESS` for
        each status address) once ready. Returns when every tunnel or worker has stopped."""
        try:
            await self._run(task_status=task_status)
        finally:
            self._remove_pidfile()
        event(logging.INFO, "stopped", "stopped")

    async def _run(self, *, task_status: trio.TaskStatus[Any]) -> None:
        self._prepare()
        with trio.open_signal_receiver(*SIGNALS) as signals:
            async with trio.open_nursery() as helpers:
                self._helpers = helpers
                addresses: dict[str, Any] = {}
                # The status addresses first: one that cannot be served is an error before
                # any tunnel says it is listening.
                respond = self._responder()
                for address in self.status_addresses:
                    origin = status_origin(address, self._given_status, self._configs())
                    sockets = self._status_sockets.setdefault(address, [])
                    addresses[f"status {address}"] = await start_status(helpers, address, respond, origin, sockets)
                for address in set(self._status_sockets) - set(self.status_addresses):
                    # Handed over by an upgrade for a status address the configuration no
                    # longer has: close it, or its clients would wait for an answer forever.
                    for sock in self._status_sockets.pop(address):
                        sock.close()
                async with trio.open_nursery() as serving:
                    addresses.update(await self._start(serving, helpers))
                    helpers.start_soon(self._watch_signals, signals)
                    if self.watch_interval > 0:
                        await helpers.start(self._watch_files)  # before ready: no change missed
                    self._running(helpers)
                    event(logging.INFO, "ready", f"ready {self.counted}=%d", self._count())
                    if self.takeover is not None:
                        await self._take_over(self.takeover)
                    else:
                        self._notify_ready()
                    self._write_pidfile()
                    task_status.started(addresses)
                helpers.cancel_scope.cancel()

    async def _take_over(self, takeover: TakeOver) -> None:
        """The old process hears READY=1 and answers; then systemd is told this is the
        main process now (MAINPID=, which needs NotifyAccess=all: the message comes from a
        process that is not the main one yet) and ready."""
        await takeover.ready()
        self.takeover = None
        event(logging.INFO, "took_over", "took over: pid %d serves now", os.getpid(), pid=os.getpid())
        self.notifier.send(f"MAINPID={os.getpid()}", "READY=1", f"STATUS={self._count()} {self.counted} listening")

    def _write_pidfile(self) -> None:
        """Write the pid atomically (a reader never sees a half-written file)."""
        if self.pidfile is None:
            return
        tmp = self.pidfile.with_name(f".{self.pidfile.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.pidfile)

    def _remove_pidfile(self) -> None:
        """Remove the pidfile if it still names this process (after an upgrade it names
        the new one)."""
        if self.pidfile is None or self._pidfile_handed_over:
            # Handed over: the new process writes the file once it has taken over, maybe
            # between our reading it and unlinking it, so this process leaves it alone.
            return
        with contextlib.suppress(OSError, ValueError):
            if int(self.pidfile.read_text()) == os.getpid():
                self.pidfile.unlink()

    def _notify_ready(self) -> None:
        self.notifier.ready(f"{self._count()} {self.counted} listening")

    async def _announced(self, reload: Callable[[], Awaitable[_T]]) -> _T:
        """Run `reload` between sd_notify RELOADING=1 and READY=1."""
        self.notifier.reloading()
        result = await reload()
        self._notify_ready()
        return result

    def _begin_stopping(self, *, notify: bool = True) -> None:
        """From now on: stopping (no reload), and the service manager is told so (not
        after a hand-over: the service goes on in the new process)."""
        self._stopping = True
        self._stop_time = time.monotonic()
        if notify:
            self.notifier.stopping()

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                event(logging.INFO, "reloading", "reloading on SIGHUP", reason="SIGHUP")
                await self.reload()
            elif signum == signal.SIGUSR2:
                self._upgrade_requested()
            elif (
                self._ignore_duplicate_stop and self._stopping and time.monotonic() - self._stop_time < DUPLICATE_WINDOW
            ):
                continue  # the same stop reaching a worker twice (service manager and supervisor)
            elif not self._stopping:
                if self._upgrade_scope is not None:
                    self._upgrade_scope.cancel()  # a stop wins over an upgrade not yet done
                event(logging.INFO, "stopping", "stopping on %s: %s", name, self.stopping_note, reason=name)
                self._stop(signum)
            else:
                event(logging.INFO, "closing_all", "second %s: %s", name, self.closing_note, reason=name)
                self._close_all(signum)

    # -- the hand-over upgrade (tunnel/upgrade.py) ----------------------------------------

    def _upgrade_requested(self) -> None:
        if not self.upgradable:
            return  # a worker: the supervisor is upgraded, and starts new workers itself
        why = "stopping" if self._stopping else "an upgrade is under way" if self._upgrading else None
        if why is not None:
            event(logging.INFO, "upgrade_ignored", "SIGUSR2 ignored: %s", why, reason=why)
            return
        assert self._helpers is not None
        self._upgrading = True
        self._helpers.start_soon(self._upgrade)

    async def _upgrade(self) -> None:
        event(
            logging.INFO,
            "upgrading",
            "upgrading on SIGUSR2: starting a new process with every listening socket (ready within %gs)",
            READY_TIMEOUT,
            reason="SIGUSR2",
        )
        status = [(address, sock) for address, socks in self._status_sockets.items() for sock in socks]
        process, why = None, "stopping: the new process was killed"
        with trio.CancelScope() as self._upgrade_scope:  # a stop meanwhile cancels the upgrade
            process, why = await start_new_process(self._listening(), status, kept=self._kept())
        self._upgrade_scope = None
        if process is None:
            self._upgrading = False
            event(logging.ERROR, "upgrade_failed", "upgrade failed, still serving: %s", why, reason=why)
            return
        event(
            logging.INFO,
            "upgraded",
            "upgraded: pid %d took over; no longer accepting, draining open connections",
            process.pid,
            pid=process.pid,
        )
        self._upgrading = True  # no second upgrade from a process that has handed over
        self._pidfile_handed_over = True  # the new process writes it: never remove it now
        self._handed_over()

    def _watched(self) -> tuple[list[Path], list[Path]]:
        return watched_files(self.paths, self._configs())

    async def _watch_files(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def changed() -> None:
            event(logging.INFO, "reloading", "a configuration file changed: reloading", reason="file changed")
            await self.reload()

        await watch(self._watched, changed, interval=self.watch_interval, task_status=task_status)
