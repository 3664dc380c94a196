"""Many tunnels in one trio run: start them, handle signals (reload, drain, stop), log."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from tunnel.config import ConfigError, TunnelConfig, load_paths
from tunnel.tunnel import Tunnel, TunnelState

log = logging.getLogger("tunnel")


def build_states(configs: Sequence[TunnelConfig]) -> list[TunnelState]:
    """Every tunnel's runtime state, or ConfigError for the first that cannot be built."""
    return [TunnelState.build(config) for config in configs]


class Daemon:
    """The tunnels of one `tunnel run`, and what signals do to them."""

    def __init__(self, paths: Sequence[Path], states: Sequence[TunnelState]) -> None:
        self.paths = list(paths)
        self.tunnels = [Tunnel(state) for state in states]
        self._stopping = False

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind every tunnel, report their addresses (name → sockname), serve until a
        SIGTERM/SIGINT has drained them all. SIGHUP reloads."""
        for tunnel in self.tunnels:
            tunnel.bind()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                addresses = {}
                async with trio.open_nursery() as tunnels:
                    for tunnel in self.tunnels:
                        addresses[tunnel.name] = await tunnels.start(tunnel.serve)
                    nursery.start_soon(self._watch_signals, signals)
                    log.info("ready tunnels=%d", len(self.tunnels))
                    task_status.started(addresses)
                nursery.cancel_scope.cancel()
        log.info("stopped")

    async def _watch_signals(self, signals: Any) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.reload()
            elif not self._stopping:
                log.info("stopping on %s: no new connections; draining open ones", signal.Signals(signum).name)
                self.stop()
            else:
                log.info("second %s: closing every connection now", signal.Signals(signum).name)
                for tunnel in self.tunnels:
                    tunnel.abort()

    def stop(self) -> None:
        self._stopping = True
        for tunnel in self.tunnels:
            tunnel.stop()

    def reload(self) -> bool:
        """Build the new state of every tunnel first; swap only if all of it is valid."""
        try:
            states = {state.config.name: state for state in build_states(load_paths(self.paths))}
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        for tunnel in self.tunnels:
            new = states.get(tunnel.name)
            if new is None:
                log.warning("reload: tunnel %s is no longer configured; a restart stops it", tunnel.name)
            elif new.config.listen != tunnel.state.config.listen:
                log.warning("reload: tunnel %s: a listen change needs a restart", tunnel.name)
            else:
                tunnel.state = new
        log.info("reloaded tunnels=%d", len(self.tunnels))
        return True


def setup_logging(log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("tunnel")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
