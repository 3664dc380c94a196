"""The process's file descriptor limit (RLIMIT_NOFILE), raised to what the tunnels' limits
need, as HAProxy and nginx (`worker_rlimit_nofile`) do for themselves.

Every relayed connection holds two descriptors (the accepted socket and the dialled one),
so a tunnel with `limits.max_connections: 10000` needs about 20,000. The soft limit a
process starts with is often 1,024 (a login shell; systemd's default `LimitNOFILE=` is
1024:524288), far below; the hard limit is usually much higher, and any process may raise
its soft limit up to its hard limit (getrlimit(2), "RLIMIT_NOFILE"). `tunnel run` does so
at start, and says so in its log when even the hard limit is short of what the
configuration asks for: then accept(2) fails with EMFILE at the cap, and the tunnel
retries later (see `listener`), instead of serving up to `max_connections`.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable

from tunnel import logs
from tunnel.config import TunnelConfig

# Descriptors a process needs besides its connections: listeners, the status server and
# its clients, log files, the event loop's epoll and wakeup pipe, watched files, pipes to
# workers. Generous: a short count means EMFILE under load.
SPARE = 64


def needed(configs: Iterable[TunnelConfig]) -> int:
    """File descriptors the tunnels need at their connection caps: two per connection
    (accepted + dialled) under every tunnel's limits.max_connections, plus SPARE."""
    return SPARE + sum(2 * config.limits.max_connections for config in configs)


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


def ensure(configs: Iterable[TunnelConfig]) -> int:
    """At start: raise the soft limit (`raise_to_hard_limit`) and log a warning when it is
    below `needed(configs)`. Returns the soft limit."""
    need = needed(configs)
    soft, hard = raise_to_hard_limit()
    if soft != resource.RLIM_INFINITY and soft < need:
        logs.event(
            logging.WARNING,
            "fd_limit_low",
            "file descriptor limit %d (hard limit %d) is below the %d that limits.max_connections "
            "needs (2 per connection): connections past about %d wait for a free descriptor; "
            "raise it with LimitNOFILE= (systemd) or ulimit -n",
            soft,
            hard,
            need,
            max(soft - SPARE, 0) // 2,
            limit=soft,
            hard_limit=hard,
            needed=need,
        )
    return soft
