"""A real redis-server behind a client+server tunnel pair: redis-cli and redis-benchmark
talk plaintext to the client tunnel, which carries it over mutual TLS to the server
tunnel, which forwards plaintext to redis."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers import PKI
from tests.system.services import LOCALHOST, Redis, free_port, redis_benchmark, redis_cli, require_tool
from tests.system.tunnel_process import (
    MIB,
    address,
    big_value,
    client_doc,
    redis_get_raw,
    redis_set_from_stdin,
    run_tunnel,
    server_doc,
)


def test_redis_through_tunnel_pair(redis_server: Redis, pki_files: PKI, tmp_path: Path) -> None:
    server_port, client_port = free_port(), free_port()
    server = server_doc(pki_files, name="redis-in", port=server_port, target=address(redis_server.port))
    client = client_doc(pki_files, name="redis-out", port=client_port, target=address(server_port))
    with run_tunnel(tmp_path / "tunnel", server, client) as tunnel:
        assert redis_cli(client_port, "ping") == "PONG"

        value = big_value()
        assert redis_set_from_stdin(client_port, "big", value) == "OK"
        assert redis_cli(client_port, "strlen", "big") == str(MIB)
        assert redis_get_raw(client_port, "big") == value
        # ... and it really is in redis, not just echoed by something in between.
        assert redis_get_raw(redis_server.port, "big") == value

        rates, output = redis_benchmark(client_port, requests=20000, clients=20)
        print(f"redis-benchmark through the tunnel pair: {rates}")
        assert set(rates) == {"SET", "GET"}, output
        assert all(rate > 0 for rate in rates.values()), rates

        log = tunnel.log_text()
        assert "opened tunnel=redis-in" in log
        assert "opened tunnel=redis-out" in log
        assert "refused" not in log, log


def test_redis_client_not_in_allow_list_is_refused(redis_server: Redis, pki_files: PKI, tmp_path: Path) -> None:
    server_port, client_port = free_port(), free_port()
    server = server_doc(
        pki_files, name="redis-in", port=server_port, target=address(redis_server.port), allow_cn=["app1"]
    )
    client = client_doc(pki_files, name="app2-out", port=client_port, target=address(server_port), cert="app2")
    before = redis_connections(redis_server.port)
    with run_tunnel(tmp_path / "tunnel", server, client) as tunnel:
        cli = require_tool("redis-cli")
        result = subprocess.run(
            [cli, "-h", LOCALHOST, "-p", str(client_port), "ping"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        assert "PONG" not in result.stdout, result
        tunnel.wait_for_log(r"refused: not allowed.* tunnel=redis-in .*identity=\S*app2")
        assert "opened tunnel=redis-in" not in tunnel.log_text()
    # The refusal came before the target was dialled: redis saw only our INFO calls.
    assert redis_connections(redis_server.port) == before + 1


def redis_connections(port: int) -> int:
    """How many connections redis has accepted so far (counting this one)."""
    stats = redis_cli(port, "info", "stats")
    match = re.search(r"total_connections_received:(\d+)", stats)
    assert match is not None, stats
    return int(match.group(1))
