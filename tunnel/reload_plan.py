"""What a reload does to each tunnel, decided from the old and new configuration alone.

A tunnel is known by its name (the YAML file's stem). Between the configuration in force
and the one just loaded, each name is:

* new: started (its listen address is bound first, so a reload that cannot bind it
  changes nothing);
* gone: stopped; its open connections get `limits.drain_timeout`;
* moved (same name, another `listen`): a new listener is started and the old one stops
  accepting, its open connections going on until they end by themselves;
* kept (same name, same `listen`): the running tunnel takes the new state for every new
  connection, and keeps its listener.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tunnel.config import TunnelConfig


@dataclass(frozen=True)
class ReloadPlan:
    """Tunnel names, each tuple in configuration order: `start` those of the new
    configuration that need a listener of their own (new names and moved ones, in the new
    configuration's order); `stop` names gone; `move` names whose listen address changed
    (their old listener drains without accepting; each is in `start` too); `keep` names
    whose listen address stays (their running tunnel takes the new state). `stop`, `move`
    and `keep` follow the old configuration's order and together name all of it."""

    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    move: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()


def plan_reload(old: Mapping[str, TunnelConfig], new: Mapping[str, TunnelConfig]) -> ReloadPlan:
    """The plan to go from `old` to `new` (both: tunnel name → its configuration). Only
    names and `listen` addresses matter; anything else that changed is the kept tunnel's
    new state."""
    return ReloadPlan(
        start=tuple(name for name, config in new.items() if name not in old or old[name].listen != config.listen),
        stop=tuple(name for name in old if name not in new),
        move=tuple(name for name, config in old.items() if name in new and new[name].listen != config.listen),
        keep=tuple(name for name, config in old.items() if name in new and new[name].listen == config.listen),
    )
