"""Self-tests of the system-test service helpers."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.system.services import (
    DEBIAN_PACKAGES,
    LOCALHOST,
    MariaDB,
    Postgres,
    Redis,
    ServiceError,
    conninfo,
    free_port,
    mariadb_query,
    psql,
    redis_benchmark,
    redis_cli,
    require_tool,
    run_stunnel,
    stunnel_accept_ports,
    stunnel_config,
    wait_for_port,
)


def test_redis_ping(redis_server: Redis) -> None:
    assert redis_server.process.poll() is None
    assert redis_cli(redis_server.port, "ping") == "PONG"
    assert redis_cli(redis_server.port, "set", "k", "v") == "OK"
    assert redis_cli(redis_server.port, "get", "k") == "v"


def test_redis_benchmark(redis_server: Redis) -> None:
    rates, output = redis_benchmark(redis_server.port, requests=1000)
    assert set(rates) == {"SET", "GET"}, output
    assert all(rate > 0 for rate in rates.values()), rates


def test_mariadb_select_1(mariadb_server: MariaDB) -> None:
    assert mariadb_query(mariadb_server.port, "SELECT 1") == "1\n"
    user = mariadb_query(mariadb_server.port, "SELECT CURRENT_USER()").strip()
    assert user == "tunnel@%"
    # Plain MySQL protocol: no TLS on the client connection.
    cipher = mariadb_query(mariadb_server.port, "SHOW SESSION STATUS LIKE 'Ssl_cipher'")
    assert cipher.split("\t")[1].strip() == "", cipher


def test_mariadb_database(mariadb_server: MariaDB, mariadb_database: str) -> None:
    port = mariadb_server.port
    mariadb_query(port, "CREATE TABLE t (id INT PRIMARY KEY, v TEXT)", database=mariadb_database)
    mariadb_query(port, "INSERT INTO t VALUES (1, 'a'), (2, 'b')", database=mariadb_database)
    assert mariadb_query(port, "SELECT v FROM t ORDER BY id", database=mariadb_database) == "a\nb\n"


def test_mariadb_query_error_has_stderr(mariadb_server: MariaDB) -> None:
    with pytest.raises(ServiceError, match="SELEKT"):
        mariadb_query(mariadb_server.port, "SELEKT 1")


def test_postgres_takes_plaintext_tcp_and_counts_its_connections(postgres_server: Postgres) -> None:
    assert postgres_server.query("SELECT current_user") == "app1"
    before = postgres_server.tcp_connections()
    tcp = conninfo(host=LOCALHOST, port=postgres_server.port, user="app1", dbname="postgres", sslmode="disable")
    result = psql(tcp, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert (result.returncode, result.stdout) == (0, "f\n"), result.stderr
    assert postgres_server.tcp_connections() == before + 1


def test_postgres_tls_only_refuses_plaintext(postgres_tls_server: Postgres) -> None:
    tcp = conninfo(host=LOCALHOST, port=postgres_tls_server.port, user="app1", dbname="postgres", sslmode="disable")
    result = psql(tcp, "SELECT 1")
    assert result.returncode == 2
    assert "no pg_hba.conf entry" in result.stderr


def test_postgres_query_error_has_stderr(postgres_server: Postgres) -> None:
    with pytest.raises(ServiceError, match="SELEKT"):
        postgres_server.query("SELEKT 1")


def test_conninfo_quotes_values() -> None:
    assert conninfo(host="h", password="it's a \\ test") == "host='h' password='it\\'s a \\\\ test'"


def test_stunnel_version(stunnel_path: str) -> None:
    # stunnel prints its version on stderr and may exit non-zero: accept that.
    result = subprocess.run([stunnel_path, "-version"], capture_output=True, text=True, timeout=30, check=False)
    assert re.search(r"stunnel \d+\.\d+", result.stdout + result.stderr), result


def test_stunnel_config_and_ports(tmp_path: Path) -> None:
    text = "[a]\nclient = yes\naccept = 127.0.0.1:1234\nconnect = 127.0.0.1:5678\n"
    full = stunnel_config(tmp_path, text)
    assert "foreground = yes" in full
    assert "\npid =\n" in full
    assert "debug = 4" in full
    assert f"output = {tmp_path / 'stunnel.log'}" in full
    assert stunnel_accept_ports(full) == [("127.0.0.1", 1234)]
    custom = stunnel_config(tmp_path, "debug = 7\n" + text)
    assert "debug = 4" not in custom


def test_run_stunnel_client_mode(stunnel_path: str, tmp_path: Path) -> None:
    # A TLS-client service needs no certificate: enough to prove start/ready/stop.
    port = free_port()
    config = f"[c]\nclient = yes\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{free_port()}\n"
    with run_stunnel(tmp_path, config) as process:
        assert process.poll() is None
    assert process.returncode is not None


def test_run_stunnel_bad_config_reports_log(stunnel_path: str, tmp_path: Path) -> None:
    config = f"[bad]\naccept = 127.0.0.1:{free_port()}\nconnect = 127.0.0.1:1\nno_such_opt = 1\n"
    with pytest.raises(ServiceError, match="no_such_opt"), run_stunnel(tmp_path, config):
        pass


def test_wait_for_port_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(ServiceError, match="timed out"):
        wait_for_port("127.0.0.1", free_port(), timeout=0.3)
    assert time.monotonic() - start < 5


def test_require_tool_found() -> None:
    path = require_tool("no-such-tool-for-tunnel", "redis-server")
    assert Path(path).is_absolute()
    assert Path(path).name == "redis-server"


def test_require_tool_missing_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TUNNEL_REQUIRE_SYSTEM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-for-tunnel not found"):
        require_tool("no-such-tool-for-tunnel")
    monkeypatch.setitem(DEBIAN_PACKAGES, "no-such-tool-for-tunnel", "stunnel4")
    with pytest.raises(pytest.skip.Exception, match="apt-get install stunnel4"):
        require_tool("no-such-tool-for-tunnel")


@pytest.mark.parametrize(("var", "value"), [("CI", "true"), ("TUNNEL_REQUIRE_SYSTEM", "1")])
def test_require_tool_missing_fails_in_ci(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("TUNNEL_REQUIRE_SYSTEM", raising=False)
    monkeypatch.setenv(var, value)
    monkeypatch.setitem(DEBIAN_PACKAGES, "no-such-tool-for-tunnel", "redis-tools")
    with pytest.raises(pytest.fail.Exception, match="apt-get install redis-tools"):
        require_tool("no-such-tool-for-tunnel")
