"""The process's file descriptor limit (RLIMIT_NOFILE), raised to what the tunnels' limits
need, as HAProxy and nginx (`worker_rlimit_nofile`) do for themselves.

Every relayed connection holds two descriptors (the accepted socket and the dialled one),
so a tunnel with `limits.max_connections: 10000` needs about 20,000. The soft limit a
process starts with is often 1,024 (a login shell; systemd's default `LimitNOFILE=` is
1024:524288), far below; the hard limit is usually much higher, and any process may raise
its soft limit up to its hard limit (getrlimit(2), "RLIMIT_NOFILE"). `tunnel run` does so
at start (`raise_to_hard_limit`). When even that is short of what the configuration asks
for, `fit` lowers the caps to what fits, and says so in the log: a connection past the cap
then waits in the kernel's backlog, rather than being accepted and closed when its dial
fails with EMFILE.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable, Sequence
from dataclasses import replace

from tunnel import logs
from tunnel.config import TunnelConfig

# Descriptors a process needs besides its connections: listeners, the status server and
# its clients, log files, the event loop's epoll and wakeup pipe, watched files, pipes to
# workers. Generous: a short count means EMFILE under load.
SPARE = 64


def needed(configs: Iterable[TunnelConfig]) -> int:
    """File descriptors the tunnels need at their connection caps: two per connection
    (accepted + dialled) under every tunnel's limits.max_connections, one per listening
    socket, plus SPARE."""
    configs = list(configs)
    return _fixed(configs) + sum(2 * config.limits.max_connections for config in configs)


def _fixed(configs: Sequence[TunnelConfig]) -> int:
    """Descriptors held whatever the connections: SPARE and the listening sockets."""
    return SPARE + len({config.listen for config in configs})


def raise_to_hard_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (never lowers it). Returns (soft,
    hard) as they are afterwards; RLIM_INFINITY is returned as it is (-1 on Linux)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an infinite hard limit above the kernel's nr_open
            pass
    return soft, hard


def fit(configs: Sequence[TunnelConfig]) -> list[TunnelConfig]:
    """The tunnels' configurations with limits.max_connections lowered, each in proportion,
    so that two descriptors per connection fit under the current soft limit (the other caps
    lowered with it where they exceed it). Unchanged when they fit. When they do not, a
    warning is logged: a connection past the lowered cap then waits in the kernel's
    backlog, as at max_connections, instead of being accepted and failing when its dial
    finds no descriptor (EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = needed(configs)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return list(configs)
    fixed = _fixed(configs)
    share = max(soft - fixed, 0) / (need - fixed)
    fitted = [_with_cap(config, max(1, int(config.limits.max_connections * share))) for config in configs]
    caps = ", ".join(f"{config.name} {config.limits.max_connections}" for config in fitted)
    logs.event(
        logging.WARNING,
        "fd_limit_low",
        "file descriptor limit %d (hard limit %d) is below the %d that limits.max_connections needs "
        "(2 per connection): max_connections lowered to fit (%s); raise the limit with LimitNOFILE= "
        "(systemd) or ulimit -Hn",
        soft,
        hard,
        need,
        caps,
        limit=soft,
        hard_limit=hard,
        needed=need,
        max_connections={config.name: config.limits.max_connections for config in fitted},
    )
    return fitted


def _with_cap(config: TunnelConfig, cap: int) -> TunnelConfig:
    limits = config.limits
    if cap >= limits.max_connections:
        return config
    max_handshakes = min(limits.max_handshakes, cap)
    return replace(
        config,
        limits=replace(
            limits,
            max_connections=cap,
            max_handshakes=max_handshakes,
            per_source_handshakes=min(limits.per_source_handshakes, max_handshakes),
            per_source_connections=min(limits.per_source_connections, cap),
            per_identity_connections=min(limits.per_identity_connections, cap),
        ),
    )
