"""Many tunnels in one trio run: start them, reload them (on SIGHUP or when a file they
were configured from changes), warn about expiring certificates, drain and stop. The
process shell (signals, file watching, readiness) is tunnel/control.py's; what a reload
does to each tunnel is tunnel/reload_plan.py's."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from tunnel import fd_limit
from tunnel.config import Address, ConfigError, TunnelConfig, load_paths
from tunnel.control import ControlLoop
from tunnel.listener import Listeners
from tunnel.logs import event
from tunnel.metrics import PrometheusMetrics
from tunnel.notify import Notifier
from tunnel.reload_plan import plan_reload
from tunnel.renewal import RETRY_FIRST, RETRY_MAX, RenewError, renew, renewal_due
from tunnel.state import TunnelState
from tunnel.status import Responder, StatusServer
from tunnel.trust import check_certificates
from tunnel.tunnel import Tunnel
from tunnel.upgrade import TakeOver
from tunnel.watch import DEFAULT_INTERVAL

log = logging.getLogger("tunnel")

EXPIRY_CHECK_EVERY = 24 * 3600.0
CRL_WARNING = timedelta(days=7)
SUPERVISOR_CHECK_EVERY = 0.5
RELOAD_RETRY_FIRST = 1.0  # seconds before a failed reload is tried again, doubling...
RELOAD_RETRY_MAX = 30.0  # ...up to this
_NOW = re.compile(r"now \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")  # the current time in an error: not a new reason


def build_states(configs: Sequence[TunnelConfig]) -> list[TunnelState]:
    """Every tunnel's runtime state, or ConfigError for the first that cannot be built."""
    return [TunnelState.build(config) for config in configs]


def load_states(paths: Sequence[Path]) -> dict[str, TunnelState]:
    """Read every tunnel file and build every state, by tunnel name: all the file reading
    and parsing of a reload, with no trio in it, so that it can run in a worker thread."""
    configs = fd_limit.fit(load_paths(paths))  # max_connections within the file descriptor limit
    return {state.config.name: state for state in build_states(configs)}


@dataclass(frozen=True)
class ReloadFailure:
    """A reload that keeps failing: since when (epoch seconds) and the latest reason."""

    since: float
    reason: str

    def describe(self) -> dict[str, str]:
        """For /healthz and `tunnel status`."""
        since = datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds")
        return {"failing_since": since, "reason": self.reason}


class Daemon(ControlLoop):
    """The tunnels of one `tunnel run` (or of one of its workers), and what signals and
    file changes do to them."""

    def __init__(
        self,
        paths: Sequence[Path],
        states: Sequence[TunnelState],
        *,
        watch_interval: float = DEFAULT_INTERVAL,
        status: Sequence[Address] = (),
        notifier: Notifier | None = None,
        worker: bool = False,
        listeners: Listeners | None = None,
        renews: bool = True,
        takeover: TakeOver | None = None,
        pidfile: Path | None = None,
    ) -> None:
        """`listeners`: the registry of listening sockets, holding any the process was
        handed (a worker's from its supervisor); a new one otherwise. `renews`: this
        process renews the certificates of tunnels with `tls.renew` (of several workers,
        one does)."""
        super().__init__(
            paths,
            status=status,
            # A worker serves only the private status address its supervisor gave it.
            status_configs=[] if worker else [s.config for s in states],
            watch_interval=watch_interval,
            notifier=notifier,
            ignore_duplicate_stop=worker,
            takeover=takeover,
            pidfile=pidfile,
        )
        self.upgradable = not worker
        self.tunnels: list[Tunnel] = []
        self._retiring: list[Tunnel] = []  # stopped by a reload, still draining
        self.metrics = PrometheusMetrics(self.all_tunnels)
        self.worker = worker  # one of several processes: listeners use SO_REUSEPORT
        self.listeners = listeners or Listeners(reuse_port=worker)  # one owner of every listening socket
        if takeover is not None:  # the sockets of the process this one upgrades: ours now
            for address, socks in takeover.by_address().items():
                kept = address in takeover.kept  # systemd's: kept open, its file never unlinked
                self.listeners.adopt(address, socks[0], owned=not kept, keep=kept)
                for extra in socks[1:]:  # a supervisor's, one per worker: one process serves now
                    if extra is not socks[0]:
                        extra.close()
        self.tunnels = [Tunnel(state, self.metrics, listeners=self.listeners) for state in states]
        self._reload_lock = trio.Lock()
        self._tunnel_nursery: trio.Nursery | None = None
        self.reload_failure: ReloadFailure | None = None
        self._retry_delay = RELOAD_RETRY_FIRST
        self._retrying = False
        self.renews = renews
        self._renewals: dict[str, tuple[object, trio.CancelScope]] = {}  # name → (what it renews, its task)
        self.renewal_failures: dict[str, ReloadFailure] = {}  # tunnel name → its renewal failing

    def serving_tunnels(self) -> list[Tunnel]:
        """The tunnels of the configuration in force (listening unless stopping)."""
        return self.tunnels

    def all_tunnels(self) -> list[Tunnel]:
        """Serving tunnels first, then those a reload stopped that are still draining."""
        return [*self.tunnels, *self._retiring]

    # -- the control loop's parts (tunnel/control.py) ------------------------------

    def _configs(self) -> list[TunnelConfig]:
        return [tunnel.state.config for tunnel in self.tunnels]

    def _responder(self) -> Responder:
        return StatusServer(
            self.all_tunnels, self.metrics, serving=self.serving_tunnels, extra=self._health_extra
        ).respond

    def _prepare(self) -> None:
        for tunnel in self.tunnels:
            tunnel.bind()

    async def _start(self, serving: trio.Nursery, helpers: trio.Nursery) -> dict[str, Any]:
        """Serve every tunnel; their addresses (name → sockname)."""
        self._tunnel_nursery = serving
        addresses = {tunnel.name: await serving.start(tunnel.serve) for tunnel in self.tunnels}
        if self.takeover is not None:  # handed over for an address no tunnel has any more
            for address in self.takeover.addresses():
                self.listeners.discard(address)
        return addresses

    def _running(self, helpers: trio.Nursery) -> None:
        helpers.start_soon(self._warn_about_expiry)
        self._plan_renewals()
        if self.worker:
            helpers.start_soon(self._watch_supervisor, os.getppid())

    def _count(self) -> int:
        return len(self.tunnels)

    def _stop(self, signum: int) -> None:
        self.stop()

    def _listening(self) -> list[tuple[Address, socket.socket]]:
        return self.listeners.items()

    def _kept(self) -> set[Address]:
        return self.listeners.kept()

    def _handed_over(self) -> None:
        self.listeners.keep_files()
        self._begin_stopping(notify=False)
        for tunnel in self.all_tunnels():
            tunnel.stop()

    def _close_all(self, signum: int) -> None:
        for tunnel in self.all_tunnels():
            tunnel.abort()

    async def _watch_supervisor(self, supervisor: int) -> None:
        """A worker whose supervisor is gone (killed outright) must not live on alone."""
        while os.getppid() == supervisor:  # noqa: ASYNC110 (no event tells us the parent died)
            await trio.sleep(SUPERVISOR_CHECK_EVERY)
        event(
            logging.ERROR, "supervisor_gone", "worker: the supervisor (pid %d) is gone: closing everything", supervisor
        )
        self._stopping = True
        for tunnel in self.all_tunnels():
            tunnel.abort()

    def stop(self) -> None:
        """Stop accepting; open connections get their tunnel's limits.drain_timeout."""
        self._begin_stopping()
        for tunnel in self.all_tunnels():
            tunnel.stop()

    # -- reload --------------------------------------------------------------------

    async def reload(self, *, retry: bool = False) -> bool:
        """Build and validate the complete new state (and bind any new listen address)
        first; only then swap it in. On any failure nothing changes, and the reload is
        tried again after RELOAD_RETRY_FIRST seconds, doubling to RELOAD_RETRY_MAX, until
        it succeeds (a certificate not valid yet, a file half-rotated: cert-manager and
        Vault Agent write a file once). A reload that is not a retry starts the backoff
        over. A retry logs its failure only when the reason is new."""
        if self._stopping:
            return False
        if not retry:
            self._retry_delay = RELOAD_RETRY_FIRST
        failure = await self._announced(self._locked_reload)
        now = time.time()
        previous = self.reload_failure
        if failure is None:
            if previous is not None:
                since = previous.describe()["failing_since"]
                event(logging.INFO, "reload_recovered", "reload succeeded after failing since %s", since, since=since)
            self.reload_failure = None
            return True
        if not retry or previous is None or _NOW.sub("", previous.reason) != _NOW.sub("", failure):
            _reload_failed(failure)
        self.reload_failure = ReloadFailure(previous.since if previous else now, failure)
        if not self._retrying and self._helpers is not None:
            self._retrying = True
            self._helpers.start_soon(self._retry_reload)
        return False

    async def _retry_reload(self) -> None:
        try:
            while self.reload_failure is not None and not self._stopping:
                delay = self._retry_delay
                self._retry_delay = min(delay * 2, RELOAD_RETRY_MAX)
                await trio.sleep(delay)
                if self.reload_failure is not None:
                    await self.reload(retry=True)
        finally:
            self._retrying = False

    async def _locked_reload(self) -> str | None:
        async with self._reload_lock:  # a SIGHUP and a file change at once: one after the other
            failure = await self._reload()
        self.metrics.reloaded(failure is None, time.time())
        return failure

    def _health_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"reload": self.reload_failure.describe()} if self.reload_failure else {}
        if self.renewal_failures:
            extra["renewal"] = {name: failure.describe() for name, failure in sorted(self.renewal_failures.items())}
        return extra

    async def _reload(self) -> str | None:
        """Reload; None on success, else why it failed (and nothing changed)."""
        try:
            # Reading keys, certificates and CRLs and building contexts takes long for a
            # large CRL: off the event loop, so open connections keep relaying meanwhile.
            states = await trio.to_thread.run_sync(load_states, self.paths)
        except ConfigError as exc:
            return str(exc)
        current = {tunnel.name: tunnel for tunnel in self.tunnels}
        plan = plan_reload(
            {name: tunnel.state.config for name, tunnel in current.items()},
            {name: state.config for name, state in states.items()},
        )
        starting = [Tunnel(states[name], self.metrics, listeners=self.listeners) for name in plan.start]
        for index, tunnel in enumerate(starting):
            try:
                tunnel.bind()
            except OSError as exc:
                for bound in starting[:index]:
                    bound.close_listener()
                return str(exc)
        # A unix: listener that stays bound takes the new unix.group and unix.mode now (or,
        # if one cannot be applied, every one goes back to what it was and nothing changes).
        keeping = [(current[name], states[name]) for name in plan.keep]
        try:
            for tunnel, state in keeping:
                tunnel.set_unix_permissions(state.config.unix)
        except OSError as exc:
            for tunnel, _ in keeping:
                with contextlib.suppress(OSError):
                    tunnel.set_unix_permissions(tunnel.state.config.unix)
            for bound in starting:
                bound.close_listener()
            return str(exc)

        # Start the new listeners first; from here to the swap below nothing yields, so
        # /healthz never sees a stopped tunnel among the serving ones.
        assert self._tunnel_nursery is not None
        for tunnel in starting:
            await self._tunnel_nursery.start(tunnel.serve)
        for name in plan.stop:
            event(logging.INFO, "tunnel_removed", "tunnel %s is no longer configured: stopping it", name, tunnel=name)
            current[name].stop()
            self._retiring.append(current[name])
        for name in plan.move:
            tunnel, new = current[name], states[name]
            old_listen, new_listen = tunnel.state.config.listen, new.config.listen
            event(
                logging.INFO,
                "tunnel_moved",
                "tunnel %s moves from %s to %s",
                name,
                old_listen,
                new_listen,
                tunnel=name,
                listen=str(new_listen),
            )
            tunnel.replace_state(new)
            tunnel.stop(drain=False)
            self._retiring.append(tunnel)
        for name in plan.keep:
            current[name].replace_state(states[name])
        self.tunnels = [current[name] for name in plan.keep] + starting
        if self._stopping:  # a stop signal came while the new tunnels were starting
            for tunnel in starting:
                tunnel.stop()
        draining = []
        for tunnel in self._retiring:
            if tunnel.connections or tunnel.listening:
                draining.append(tunnel)
            else:
                self.metrics.forget(tunnel)  # its bytes stay counted under its name
        self._retiring = draining
        for tunnel in self.all_tunnels():
            tunnel.revalidate()
        for tunnel in self.tunnels:
            for warning in tunnel.state.warnings:
                _expiring(tunnel.name, warning)
        event(logging.INFO, "reloaded", "reloaded tunnels=%d", len(self.tunnels))
        self._plan_renewals()
        return None

    # -- renewal (tls.renew) ---------------------------------------------------------

    def _plan_renewals(self) -> None:
        """One renewal task per serving tunnel with tls.renew, for the certificate loaded
        now: a task whose tunnel is gone, or whose tls settings or certificate changed
        (a renewal was loaded, a new file put in place), is cancelled and started again."""
        if self._helpers is None or not self.renews:
            return
        wanted: dict[str, object] = {
            tunnel.name: (tunnel.state.config.tls, tunnel.state.certificates.cert.serial_number)
            for tunnel in self.tunnels
            if tunnel.state.config.tls.renew is not None
        }
        for name, (key, scope) in list(self._renewals.items()):
            if wanted.get(name) != key:
                scope.cancel()
                del self._renewals[name]
                self.renewal_failures.pop(name, None)
        for name, key in wanted.items():
            if name not in self._renewals:
                scope = trio.CancelScope()
                self._renewals[name] = (key, scope)
                self._helpers.start_soon(self._renewal, name, scope)

    def _serving(self, name: str) -> Tunnel | None:
        return next((tunnel for tunnel in self.tunnels if tunnel.name == name), None)

    async def _renewal(self, name: str, scope: trio.CancelScope) -> None:
        """Wait until the certificate is due (tunnel/renewal.py renewal_due), renew it,
        retrying failures after RETRY_FIRST seconds doubling to RETRY_MAX, then reload;
        the reload re-plans (a new task for the new certificate)."""
        with scope:
            tunnel = self._serving(name)
            if tunnel is None:  # a reload removed it before this task began
                return
            tls, cert = tunnel.state.config.tls, tunnel.state.certificates.cert
            assert tls.renew is not None
            due = renewal_due(cert.not_valid_before_utc, cert.not_valid_after_utc, tls.renew, random.random())
            await trio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()))
            delay = RETRY_FIRST
            while True:
                try:
                    renewed = await renew(tls)
                    break
                except RenewError as exc:
                    self._renewal_failed(name, str(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            self.metrics.renewed(name, True)
            self.renewal_failures.pop(name, None)
            not_after = renewed.not_after.isoformat()
            event(
                logging.INFO,
                "renewed",
                "renewed the certificate of tunnel %s: serial %x, not after %s",
                name,
                renewed.serial,
                not_after,
                tunnel=name,
                serial=f"{renewed.serial:x}",
                not_after=not_after,
            )
            assert self._helpers is not None
            self._helpers.start_soon(self._reload_renewed, name)
            await trio.sleep_forever()  # until the reload loads the new certificate and re-plans

    def _renewal_failed(self, name: str, reason: str) -> None:
        self.metrics.renewed(name, False)
        previous = self.renewal_failures.get(name)
        if previous is None or previous.reason != reason:
            event(
                logging.ERROR,
                "renew_failed",
                "renewing the certificate of tunnel %s failed, still serving the current one: %s",
                name,
                reason,
                tunnel=name,
                reason=reason,
            )
        self.renewal_failures[name] = ReloadFailure(previous.since if previous else time.time(), reason)

    async def _reload_renewed(self, name: str) -> None:
        event(logging.INFO, "reloading", "tunnel %s renewed its certificate: reloading", name, reason="renewed")
        await self.reload()

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
                    _expiring(tunnel.name, warning)
                for crl in tunnel.state.trust.crls:
                    if crl.next_update - now < CRL_WARNING:
                        event(
                            logging.WARNING,
                            "crl_due",
                            "CRL due for refresh: tunnel=%s %s next update %s",
                            tunnel.name,
                            crl.path,
                            f"{crl.next_update:%Y-%m-%d %H:%M:%S} UTC",
                            tunnel=tunnel.name,
                            file=str(crl.path),
                            next_update=crl.next_update.isoformat(),
                        )
            await trio.sleep(EXPIRY_CHECK_EVERY)


def _expiring(tunnel: str, warning: str) -> None:
    event(
        logging.WARNING, "certificate_expiring", "certificate expires soon: %s", warning, tunnel=tunnel, reason=warning
    )


def _reload_failed(reason: str) -> None:
    event(
        logging.ERROR,
        "reload_failed",
        "reload failed, still serving the previous configuration: %s",
        reason,
        reason=reason,
    )
