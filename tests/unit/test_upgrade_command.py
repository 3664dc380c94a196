"""restart_command: the new process of an upgrade runs the program as it was started."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from tunnel.upgrade import TakeOver, restart_command


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
