"""Unit tests for tunnel.reload_plan: which tunnels a reload starts, stops, moves and keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel.config import Address, TLSConfig, TunnelConfig
from tunnel.reload_plan import ReloadPlan, plan_reload


def config(name: str, listen: str, *, target: str = "127.0.0.1:6379") -> TunnelConfig:
    """A tunnel listening on `listen` (`HOST:PORT`, or `unix:PATH`): all the plan looks at."""
    tls = TLSConfig(cert=Path("cert.pem"), key=Path("key.pem"), ca=Path("ca.pem"))
    host, _, port = target.rpartition(":")
    return TunnelConfig(
        name=name,
        mode="server",
        listen=Address(path=listen[5:])
        if listen.startswith("unix:")
        else Address("127.0.0.1", int(listen.split(":")[1])),
        targets=(Address(host, int(port)),),
        tls=tls,
        source=Path(f"{name}.yaml"),
    )


def configs(*tunnels: tuple[str, str]) -> dict[str, TunnelConfig]:
    return {name: config(name, listen) for name, listen in tunnels}


A1 = ("a", "127.0.0.1:7001")
A2 = ("a", "127.0.0.1:7002")
B1 = ("b", "127.0.0.1:7101")
C1 = ("c", "127.0.0.1:7201")
U1 = ("u", "unix:/run/u.sock")
U2 = ("u", "unix:/run/u2.sock")

PLANS = [
    pytest.param((), (), ReloadPlan(), id="nothing-to-nothing"),
    pytest.param((), (A1, B1), ReloadPlan(start=("a", "b")), id="first-tunnels-start"),
    pytest.param((A1, B1), (A1, B1), ReloadPlan(keep=("a", "b")), id="same-listen-keeps"),
    pytest.param((A1, B1), (B1,), ReloadPlan(stop=("a",), keep=("b",)), id="gone-stops"),
    pytest.param((A1,), (A1, C1), ReloadPlan(start=("c",), keep=("a",)), id="added-starts"),
    pytest.param((A1, B1), (A2, B1), ReloadPlan(start=("a",), move=("a",), keep=("b",)), id="new-listen-moves"),
    pytest.param((U1,), (U2,), ReloadPlan(start=("u",), move=("u",)), id="unix-path-moves"),
    pytest.param((A1,), (("a", "unix:/run/a.sock"),), ReloadPlan(start=("a",), move=("a",)), id="tcp-to-unix-moves"),
    pytest.param(
        (A1, B1, C1),
        (C1, ("d", "127.0.0.1:7301"), A2),
        ReloadPlan(start=("d", "a"), stop=("b",), move=("a",), keep=("c",)),
        id="all-at-once-in-configuration-order",
    ),
    pytest.param(
        (A1, B1),
        (("a", "127.0.0.1:7101"), ("b", "127.0.0.1:7001")),
        ReloadPlan(start=("a", "b"), move=("a", "b")),
        id="two-tunnels-swap-addresses",
    ),
    pytest.param(
        ((("b", "127.0.0.1:7001")),), (A1,), ReloadPlan(start=("a",), stop=("b",)), id="renamed-stops-and-starts"
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), PLANS)
def test_plan_reload(old: tuple[tuple[str, str], ...], new: tuple[tuple[str, str], ...], expected: ReloadPlan) -> None:
    assert plan_reload(configs(*old), configs(*new)) == expected


def test_a_kept_tunnel_whose_other_settings_changed_is_still_kept() -> None:
    old = {"a": config("a", "127.0.0.1:7001", target="127.0.0.1:6379")}
    new = {"a": config("a", "127.0.0.1:7001", target="127.0.0.1:6380")}
    assert plan_reload(old, new) == ReloadPlan(keep=("a",))


def test_every_old_tunnel_is_stopped_moved_or_kept_exactly_once() -> None:
    old, new = configs(A1, B1, C1, U1), configs(A2, C1, U2, ("d", "127.0.0.1:7301"))
    plan = plan_reload(old, new)
    assert sorted(plan.stop + plan.move + plan.keep) == sorted(old)
    assert sorted(plan.start + plan.keep) == sorted(new)
    assert set(plan.move) <= set(plan.start)
