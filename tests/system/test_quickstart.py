"""The README's quick start, run as written (scripts/quickstart.sh reads its blocks) against
a real Redis, with its ports moved to free ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.system.services import Redis, free_port, require_tool

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_quick_start_works_on_one_host(redis_server: Redis, tmp_path: Path) -> None:
    require_tool("redis-cli")
    ports = f"{free_port()} {free_port()} {free_port()}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's tunnel
        "REDIS_PORT": str(redis_server.port),
        "QUICKSTART_PORTS": ports,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "quickstart.sh"), str(tmp_path / "qs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PONG" in result.stdout, output
    assert "revoked app1" in result.stdout, output
    log = (tmp_path / "qs" / "quickstart" / "tunnel.log").read_text()
    assert "refused: revoked tunnel=redis-server" in log, log
    assert "refused: refused by server: certificate revoked tunnel=redis-client" in log, log
    assert "stopped" in log  # kill %1 ended the daemon
