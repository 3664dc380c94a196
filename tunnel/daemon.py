"""Many tunnels in one trio run: start them, reload them (on SIGHUP or when a file they
were configured from changes), warn about expiring certificates, drain and stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from tunnel.config import Address, ConfigError, TunnelConfig, load_paths, status_addresses, watched_files
from tunnel.logs import event
from tunnel.metrics import PrometheusMetrics
from tunnel.notify import Notifier
from tunnel.status import StatusServer
from tunnel.tls import check_certificates
from tunnel.tunnel import Tunnel, TunnelState
from tunnel.watch import DEFAULT_INTERVAL, watch

log = logging.getLogger("tunnel")

EXPIRY_CHECK_EVERY = 24 * 3600.0
CRL_WARNING = timedelta(days=7)
SUPERVISOR_CHECK_EVERY = 0.5
DUPLICATE_WINDOW = 1.0  # seconds in which a worker treats a repeated stop signal as the same one


def build_states(configs: Sequence[TunnelConfig]) -> list[TunnelState]:
    """Every tunnel's runtime state, or ConfigError for the first that cannot be built."""
    return [TunnelState.build(config) for config in configs]


class Daemon:
    """The tunnels of one `tunnel run`, and what signals and file changes do to them."""

    def __init__(
        self,
        paths: Sequence[Path],
        states: Sequence[TunnelState],
        *,
        watch_interval: float = DEFAULT_INTERVAL,
        status: Sequence[Address] = (),
        notifier: Notifier | None = None,
        worker: bool = False,
    ) -> None:
        self.paths = list(paths)
        self.tunnels: list[Tunnel] = []
        self._retiring: list[Tunnel] = []  # stopped by a reload, still draining
        self.metrics = PrometheusMetrics(self.all_tunnels)
        self.worker = worker  # one of several processes: listeners use SO_REUSEPORT
        self.tunnels = [Tunnel(state, self.metrics, reuse_port=worker) for state in states]
        self.watch_interval = watch_interval
        self.notifier = notifier or Notifier()
        # A worker serves only the private status address its supervisor gave it.
        self.status_addresses = status_addresses(status, [] if worker else [s.config for s in states])
        self._stopping = False
        self._stop_time = 0.0
        self._reload_lock = trio.Lock()
        self._tunnel_nursery: trio.Nursery | None = None

    def serving_tunnels(self) -> list[Tunnel]:
        """The tunnels of the configuration in force (listening unless stopping)."""
        return self.tunnels

    def all_tunnels(self) -> list[Tunnel]:
        """Serving tunnels first, then those a reload stopped that are still draining."""
        return [*self.tunnels, *self._retiring]

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every tunnel, report their addresses (name → sockname), serve until a
        SIGTERM/SIGINT has drained them all. SIGHUP reloads."""
        for tunnel in self.tunnels:
            tunnel.bind()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as helpers:
                addresses = {}
                async with trio.open_nursery() as tunnels:
                    self._tunnel_nursery = tunnels
                    for tunnel in self.tunnels:
                        addresses[tunnel.name] = await tunnels.start(tunnel.serve)
                    helpers.start_soon(self._watch_signals, signals)
                    if self.watch_interval > 0:
                        helpers.start_soon(self._watch_files)
                    helpers.start_soon(self._warn_about_expiry)
                    if self.worker:
                        helpers.start_soon(self._watch_supervisor, os.getppid())
                    status_server = StatusServer(self.all_tunnels, self.metrics, serving=self.serving_tunnels)
                    for address in self.status_addresses:
                        addresses[f"status {address}"] = await helpers.start(status_server.serve, address)
                    event(logging.INFO, "ready", "ready tunnels=%d", len(self.tunnels))
                    self.notifier.ready(f"{len(self.tunnels)} tunnels listening")
                    task_status.started(addresses)
                helpers.cancel_scope.cancel()
        event(logging.INFO, "stopped", "stopped")

    # -- signals -------------------------------------------------------------------

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("reloading on SIGHUP")
                await self.reload()
            elif self.worker and self._stopping and time.monotonic() - self._stop_time < DUPLICATE_WINDOW:
                continue  # the same stop reaching a worker twice (service manager and supervisor)
            elif not self._stopping:
                log.info("stopping on %s: no new connections; draining open ones", signal.Signals(signum).name)
                self.stop()
            else:
                log.info("second %s: closing every connection now", signal.Signals(signum).name)
                for tunnel in self.all_tunnels():
                    tunnel.abort()

    async def _watch_supervisor(self, supervisor: int) -> None:
        """A worker whose supervisor is gone (killed outright) must not live on alone."""
        while os.getppid() == supervisor:  # noqa: ASYNC110 (no event tells us the parent died)
            await trio.sleep(SUPERVISOR_CHECK_EVERY)
        log.error("worker: the supervisor (pid %d) is gone: closing everything", supervisor)
        self._stopping = True
        for tunnel in self.all_tunnels():
            tunnel.abort()

    def stop(self) -> None:
        self._stopping = True
        self._stop_time = time.monotonic()
        self.notifier.stopping()
        for tunnel in self.all_tunnels():
            tunnel.stop()

    # -- reload --------------------------------------------------------------------

    async def reload(self) -> bool:
        """Build and validate the complete new state (and bind any new listen address)
        first; only then swap it in. On any failure nothing changes."""
        if self._stopping:
            return False
        self.notifier.reloading()
        async with self._reload_lock:  # a SIGHUP and a file change at once: one after the other
            ok = await self._reload()
        self.metrics.reloaded(ok, time.time())
        self.notifier.ready(f"{len(self.tunnels)} tunnels listening")
        return ok

    async def _reload(self) -> bool:
        try:
            states = {state.config.name: state for state in build_states(load_paths(self.paths))}
        except ConfigError as exc:
            _reload_failed(exc)
            return False
        current = {tunnel.name: tunnel for tunnel in self.tunnels}
        starting = [
            Tunnel(state, self.metrics, reuse_port=self.worker)
            for name, state in states.items()
            if name not in current or current[name].state.config.listen != state.config.listen
        ]
        for index, tunnel in enumerate(starting):
            try:
                tunnel.bind()
            except OSError as exc:
                for bound in starting[:index]:
                    bound.close_listener()
                _reload_failed(exc)
                return False
        # A unix: listener that stays bound takes the new unix.group and unix.mode now (or,
        # if one cannot be applied, every one goes back to what it was and nothing changes).
        keeping = [(tunnel, states[name]) for name, tunnel in current.items() if name in states]
        try:
            for tunnel, state in keeping:
                if state.config.listen == tunnel.state.config.listen:
                    tunnel.set_unix_permissions(state.config.unix)
        except OSError as exc:
            for tunnel, _ in keeping:
                with contextlib.suppress(OSError):
                    tunnel.set_unix_permissions(tunnel.state.config.unix)
            for bound in starting:
                bound.close_listener()
            _reload_failed(exc)
            return False

        # Start the new listeners first; from here to the swap below nothing yields, so
        # /healthz never sees a stopped tunnel among the serving ones.
        assert self._tunnel_nursery is not None
        for tunnel in starting:
            await self._tunnel_nursery.start(tunnel.serve)
        kept: list[Tunnel] = []
        for name, tunnel in current.items():
            new = states.get(name)
            if new is None:
                log.info("tunnel %s is no longer configured: stopping it", name)
                tunnel.stop()
                self._retiring.append(tunnel)
            elif new.config.listen != tunnel.state.config.listen:
                log.info("tunnel %s moves from %s to %s", name, tunnel.state.config.listen, new.config.listen)
                tunnel.replace_state(new)
                tunnel.stop(drain=False)
                self._retiring.append(tunnel)
            else:
                tunnel.replace_state(new)
                kept.append(tunnel)
        self.tunnels = kept + starting
        if self._stopping:  # a stop signal came while the new tunnels were starting
            for tunnel in starting:
                tunnel.stop()
        self._retiring = [t for t in self._retiring if t.connections or t.listening]
        for tunnel in self.all_tunnels():
            tunnel.revalidate()
        for tunnel in self.tunnels:
            for warning in tunnel.state.warnings:
                log.warning("certificate expires soon: %s", warning)
        event(logging.INFO, "reloaded", "reloaded tunnels=%d", len(self.tunnels))
        return True

    def _watched(self) -> tuple[list[Path], list[Path]]:
        return watched_files(self.paths, [tunnel.state.config for tunnel in self.tunnels])

    async def _watch_files(self) -> None:
        async def changed() -> None:
            log.info("a configuration file changed: reloading")
            await self.reload()

        await watch(self._watched, changed, interval=self.watch_interval)

    # -- expiry --------------------------------------------------------------------

    async def _warn_about_expiry(self) -> None:
        """At start and then daily: certificates within 30 days of expiry, CRLs within 7."""
        while True:
            now = datetime.now(UTC)
            for tunnel in self.tunnels:
                try:
                    state = tunnel.state
                    warnings = check_certificates(state.config, now=now, certificates=state.certificates)
                except ConfigError as exc:
                    warnings = [str(exc)]
                for warning in warnings:
                    log.warning("certificate expires soon: %s", warning)
                next_update = tunnel.state.trust.crl_next_update
                if next_update is not None and next_update - now < CRL_WARNING:
                    log.warning(
                        "CRL due for refresh: tunnel=%s %s next update %s",
                        tunnel.name,
                        tunnel.state.config.tls.crl,
                        f"{next_update:%Y-%m-%d %H:%M} UTC",
                    )
            await trio.sleep(EXPIRY_CHECK_EVERY)


def _reload_failed(exc: Exception) -> None:
    event(
        logging.ERROR,
        "reload_failed",
        "reload failed, still serving the previous configuration: %s",
        exc,
        reason=str(exc),
    )
