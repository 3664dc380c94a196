"""restart_command: the new process of an upgrade runs the program as it was started."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from tunnel.config import Address
from tunnel.listener import Listeners, adopt_handed_down, handed_down
from tunnel.upgrade import TakeOver, handover, restart_command


def test_python_dash_m_is_started_again_with_its_interpreter_and_options() -> None:
    argv = ["python3", "-X", "dev", "-m", "tunnel.cli", "run", "/etc/tunnel/"]
    assert restart_command(argv, "/opt/tunnel/bin/python") == [
        "/opt/tunnel/bin/python",
        "-X",
        "dev",
        "-m",
        "tunnel.cli",
        "run",
        "/etc/tunnel/",
    ]


def test_a_console_script_runs_by_its_own_interpreter_line(tmp_path: Path) -> None:
    """A reinstalled virtualenv may hold another interpreter: the script's #! names it."""
    script = tmp_path / "tunnel"
    script.write_text("#!/new/venv/bin/python\n")
    script.chmod(0o755)
    argv = ["/old/venv/bin/python", str(script), "run", "--pidfile", "/run/t.pid", "/etc/tunnel/"]
    assert restart_command(argv, "/old/venv/bin/python") == [
        str(script),
        "run",
        "--pidfile",
        "/run/t.pid",
        "/etc/tunnel/",
    ]


def test_a_script_that_is_not_executable_runs_with_the_current_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "tunnel"
    script.write_text("")
    script.chmod(0o644)
    assert restart_command(["python", str(script), "run", "x.yaml"], sys.executable) == [
        sys.executable,
        str(script),
        "run",
        "x.yaml",
    ]


def test_an_ordinary_start_is_no_takeover_and_a_takeover_leaves_nothing_for_workers() -> None:
    assert TakeOver.from_environ({"PATH": "/bin"}) is None
    left, right = socket.socketpair()
    environ = {
        "TUNNEL_UPGRADE_FD": str(left.detach()),
        "TUNNEL_LISTEN_FDS": f"{right.detach()}=127.0.0.1:8443",
        "TUNNEL_STATUS_FDS": "",
        "PATH": "/bin",
    }
    takeover = TakeOver.from_environ(environ)
    assert takeover is not None
    assert environ == {"PATH": "/bin"}
    assert [str(address) for address, _ in takeover.listening] == ["127.0.0.1:8443"]
    takeover.channel.close()
    for _, sock in takeover.listening:
        sock.close()


def test_a_unix_path_with_a_comma_survives_the_hand_over_lists(tmp_path: Path) -> None:
    """HANDED_DOWN and HANDED_STATUS are comma-separated lists: an address
    is written percent-encoded, so that a unix: path with a comma in it comes out whole
    (it made the new process fail with ValueError: found in review)."""
    odd = Address(path=str(tmp_path / "a,b%2C.sock"))
    plain = Address(host="127.0.0.1", port=6380)
    ours, theirs = socket.socketpair()
    one, two = socket.socket(), socket.socket()
    try:
        given = handover([(odd, one), (plain, two)], [], theirs, kept=[odd])
        environ = dict(given.env)
        takeover = TakeOver.from_environ(environ)
        assert takeover is not None
        for _, sock in takeover.listening:  # the same descriptors as ours: not closed twice
            sock.detach()
        takeover.channel.detach()
        assert [address for address, _ in takeover.listening] == [odd, plain]
        assert takeover.kept == {odd}
        listeners = Listeners()
        adopt_handed_down(listeners, handed_down({odd: one}, kept=[odd]))
        for _, sock in listeners.items():
            sock.detach()
        assert odd in listeners
        assert listeners.kept() == {odd}
    finally:
        for sock in (ours, theirs, one, two):
            sock.close()
