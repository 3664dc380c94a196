"""The real psql, pgbench and libpq (psycopg) through tunnels speaking PostgreSQL's TLS
negotiation (``protocol: postgres``) to a real PostgreSQL.

Two throwaway clusters (session fixtures, conftest.py): ``postgres_server`` takes
plaintext TCP (``trust``), as behind a server tunnel; ``postgres_tls_server`` takes TLS
only, with client-certificate authentication (``hostssl all all 127.0.0.1/32 cert``),
as in front of a client tunnel. The database user is ``app1``, the CN of the client
certificate the tunnels present.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PKI
from tests.system.services import (
    LOCALHOST,
    POSTGRES_DATABASE,
    POSTGRES_USER,
    Postgres,
    conninfo,
    free_port,
    postgres_client_env,
    postgres_tool,
    psql,
    read_log,
    system_tests_required,
)
from tests.system.tunnel_process import address, client_doc, run_tunnel, server_doc

#: What the server tunnel says to a client that did not ask for TLS (tunnel/postgres.py).
TLS_REQUIRED = "this server requires TLS with a client certificate"

#: The connection's own row of pg_stat_ssl: whether PostgreSQL sees TLS, and the client DN.
SSL_OF_THIS_CONNECTION = "SELECT ssl, coalesce(client_dn, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def pg_server_doc(pki: PKI, *, port: int, target: str, allow_cn: list[str] | None = None) -> dict[str, Any]:
    return {**server_doc(pki, name="pg-in", port=port, target=target, allow_cn=allow_cn), "protocol": "postgres"}


def pg_client_doc(pki: PKI, *, port: int, target: str) -> dict[str, Any]:
    return {**client_doc(pki, name="pg-out", port=port, target=target), "protocol": "postgres"}


def tls_params(pki: PKI, cert: str = "app1") -> dict[str, str | int | Path]:
    """libpq's parameters for mutual TLS with the test PKI, the server name checked."""
    return {"sslmode": "verify-full", "sslcert": pki.crt(cert), "sslkey": pki.key(cert), "sslrootcert": pki.ca}


def to(port: int, **params: str | int | Path) -> str:
    """A libpq connection string to 127.0.0.1:PORT as the test user."""
    return conninfo(host=LOCALHOST, port=port, dbname=POSTGRES_DATABASE, user=POSTGRES_USER, **params)


def check_psql(connection: str, sql: str, log: str = "") -> str:
    result = psql(connection, sql)
    assert result.returncode == 0, f"psql: {result.stderr}\n--- tunnel log ---\n{log}"
    return result.stdout.strip()


def test_psql_with_verify_full_straight_to_a_server_tunnel(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path
) -> None:
    port = free_port()
    server = pg_server_doc(pki_files, port=port, target=address(postgres_server.port))
    with run_tunnel(tmp_path / "tunnel", server) as tunnel:
        connection = to(port, **tls_params(pki_files))
        assert check_psql(connection, "SELECT 1", tunnel.log_text()) == "1"
        # PostgreSQL itself sees a plaintext connection: the TLS was the tunnel's.
        assert check_psql(connection, SSL_OF_THIS_CONNECTION, tunnel.log_text()) == "f|"
        tunnel.wait_for_log(r"opened tunnel=pg-in ")
        assert "refused" not in tunnel.log_text()


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])
def test_psql_through_a_client_and_server_tunnel(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path, sslmode: str
) -> None:
    server_port, client_port = free_port(), free_port()
    server = pg_server_doc(pki_files, port=server_port, target=address(postgres_server.port))
    client = pg_client_doc(pki_files, port=client_port, target=address(server_port))
    with run_tunnel(tmp_path / "tunnel", server, client) as tunnel:
        sql = "SELECT current_user, length(repeat('x', 1000000))"
        assert check_psql(to(client_port, sslmode=sslmode), sql, tunnel.log_text()) == f"{POSTGRES_USER}|1000000"
        tunnel.wait_for_log(r"closed tunnel=pg-in ")
        assert "refused" not in tunnel.log_text()


def test_psql_with_sslmode_require_to_a_client_tunnel_is_told_there_is_no_tls(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path
) -> None:
    """The client tunnel answers the application's SSLRequest with 'N' (its TLS is the
    tunnel's), so an application that insists on its own TLS stops there."""
    server_port, client_port = free_port(), free_port()
    server = pg_server_doc(pki_files, port=server_port, target=address(postgres_server.port))
    client = pg_client_doc(pki_files, port=client_port, target=address(server_port))
    with run_tunnel(tmp_path / "tunnel", server, client):
        result = psql(to(client_port, sslmode="require"), "SELECT 1")
        assert result.returncode != 0
        assert "server does not support SSL, but SSL was required" in result.stderr


def test_client_tunnel_to_a_tls_only_postgres_with_certificate_authentication(
    postgres_tls_server: Postgres, pki_files: PKI, tmp_path: Path
) -> None:
    port = free_port()
    client = pg_client_doc(pki_files, port=port, target=address(postgres_tls_server.port))
    with run_tunnel(tmp_path / "tunnel", client) as tunnel:
        for sslmode in ("disable", "prefer"):
            seen = check_psql(to(port, sslmode=sslmode), SSL_OF_THIS_CONNECTION, tunnel.log_text())
            assert seen == f"t|/CN={POSTGRES_USER}", f"sslmode={sslmode}"
    # And without the tunnel, plaintext is refused by PostgreSQL itself.
    refused = psql(to(postgres_tls_server.port, sslmode="disable"), "SELECT 1")
    assert "no pg_hba.conf entry" in refused.stderr


def test_a_client_certificate_not_allowed_is_refused_before_postgres_sees_a_connection(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path
) -> None:
    port = free_port()
    server = pg_server_doc(pki_files, port=port, target=address(postgres_server.port), allow_cn=["app1"])
    with run_tunnel(tmp_path / "tunnel", server) as tunnel:
        before = postgres_server.tcp_connections()
        result = psql(to(port, **tls_params(pki_files, cert="stranger")), "SELECT 1")
        assert result.returncode != 0, result.stdout
        tunnel.wait_for_log(r"refused: .* tunnel=pg-in ")
        assert postgres_server.tcp_connections() == before, "PostgreSQL saw the refused client"
        # The count does move for a client that is allowed.
        check_psql(to(port, **tls_params(pki_files)), "SELECT 1", tunnel.log_text())
        assert postgres_server.tcp_connections() == before + 1


def test_psql_without_tls_straight_to_a_server_tunnel_gets_an_error_response(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path
) -> None:
    port = free_port()
    server = pg_server_doc(pki_files, port=port, target=address(postgres_server.port))
    with run_tunnel(tmp_path / "tunnel", server) as tunnel:
        before = postgres_server.tcp_connections()
        result = psql(to(port, sslmode="disable"), "SELECT 1")
        assert result.returncode == 2, result
        assert f"FATAL:  {TLS_REQUIRED}" in result.stderr
        tunnel.wait_for_log(r"refused: .* tunnel=pg-in ")
        assert postgres_server.tcp_connections() == before


def wait_until_running(postgres: Postgres, sql: str, timeout: float = 10.0) -> None:
    """Wait until a backend of ``postgres`` is running ``sql`` (pg_stat_activity)."""
    deadline = time.monotonic() + timeout
    escaped = sql.replace("'", "''")
    while (
        postgres.query(f"SELECT count(*) FROM pg_stat_activity WHERE query = '{escaped}' AND state = 'active'") == "0"
    ):
        assert time.monotonic() < deadline, f"{sql!r} did not start within {timeout} s"
        time.sleep(0.02)


def cancellations(postgres: Postgres) -> int:
    """How many statements PostgreSQL has cancelled at a client's request (its log)."""
    return read_log(postgres.log, limit=10**9).count("canceling statement due to user request")


def _psycopg_with_libpq_17() -> Any:
    """psycopg, with a libpq >= 17; else skip (fail where system tests are required)."""
    psycopg: Any = None
    with contextlib.suppress(ImportError):
        psycopg = importlib.import_module("psycopg")  # not typed here: it may be missing
    problem = ""
    if psycopg is None:
        problem = "psycopg is not installed: pip install -e '.[test]' (psycopg[binary] bundles libpq 18)"
    elif psycopg.pq.version() < 170000:
        problem = f"libpq 17's direct TLS and encrypted cancel: psycopg has libpq {psycopg.pq.version()}"
    if problem and system_tests_required():
        pytest.fail(f"{problem} [CI=true or TUNNEL_REQUIRE_SYSTEM=1: refusing to skip]")
    if problem:
        pytest.skip(problem)
    return psycopg


@pytest.mark.parametrize("negotiation", ["direct", "postgres"])
def test_libpq_17_straight_to_a_server_tunnel(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path, negotiation: str
) -> None:
    """libpq 17's ``sslnegotiation=direct`` starts TLS at once with ALPN ``postgresql``,
    and fails unless the server selects it; ``postgres`` (the default) sends SSLRequest
    first, and offers the ALPN too."""
    psycopg = _psycopg_with_libpq_17()
    port = free_port()
    server = pg_server_doc(pki_files, port=port, target=address(postgres_server.port))
    with run_tunnel(tmp_path / "tunnel", server) as tunnel:
        params = tls_params(pki_files)
        connection = to(port, sslnegotiation=negotiation, connect_timeout=5, **params)
        with psycopg.connect(connection) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.pgconn.ssl_in_use
        tunnel.wait_for_log(r"closed tunnel=pg-in ")
        assert "refused" not in tunnel.log_text()


def test_pgbench_through_a_client_and_server_tunnel(postgres_server: Postgres, pki_files: PKI, tmp_path: Path) -> None:
    pgbench = postgres_tool("pgbench")
    postgres_server.query("DROP DATABASE IF EXISTS bench")
    postgres_server.query("CREATE DATABASE bench")
    server_port, client_port = free_port(), free_port()
    server = pg_server_doc(pki_files, port=server_port, target=address(postgres_server.port))
    client = pg_client_doc(pki_files, port=client_port, target=address(server_port))
    connect = ["-h", LOCALHOST, "-p", str(client_port), "-U", POSTGRES_USER]
    env = postgres_client_env(PGSSLMODE="prefer")
    with run_tunnel(tmp_path / "tunnel", server, client) as tunnel:
        init = subprocess.run(
            [pgbench, *connect, "-i", "-s", "1", "-q", "bench"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert init.returncode == 0, f"{init.stderr}\n--- tunnel log ---\n{tunnel.log_text()}"
        run = subprocess.run(
            [pgbench, *connect, "-c", "4", "-j", "2", "-t", "50", "bench"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert run.returncode == 0, f"{run.stderr}\n{run.stdout}\n--- tunnel log ---\n{tunnel.log_text()}"
        assert re.search(r"number of transactions actually processed: 200/200", run.stdout), run.stdout
        assert "refused" not in tunnel.log_text()
    assert postgres_server.query("SELECT count(*) FROM pgbench_accounts", database="bench") == "100000"
    assert postgres_server.query("SELECT count(*) FROM pgbench_history", database="bench") == "200"


@pytest.mark.parametrize("path", ["server tunnel", "client and server tunnel"])
def test_libpq_cancels_a_query_through_tunnels(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path, path: str
) -> None:
    """A CancelRequest is a connection of its own: libpq 17's cancel (``PQcancelCreate``,
    psycopg's ``cancel_safe``) negotiates TLS for it as for the session; through a client
    tunnel it goes in plaintext to the tunnel, which carries it over its TLS."""
    psycopg = _psycopg_with_libpq_17()
    server_port, client_port = free_port(), free_port()
    docs = [pg_server_doc(pki_files, port=server_port, target=address(postgres_server.port))]
    if path == "server tunnel":
        connection = to(server_port, connect_timeout=5, **tls_params(pki_files))
    else:
        docs.append(pg_client_doc(pki_files, port=client_port, target=address(server_port)))
        connection = to(client_port, connect_timeout=5, sslmode="disable")
    with run_tunnel(tmp_path / "tunnel", *docs) as tunnel, psycopg.connect(connection) as conn:
        timer = threading.Timer(0.5, lambda: conn.cancel_safe(timeout=5))
        timer.start()
        try:
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            assert time.monotonic() - started < 10
        finally:
            timer.join()
        assert "refused" not in tunnel.log_text()


def test_psql_15_cancel_straight_to_a_server_tunnel_is_refused_as_plaintext(
    postgres_server: Postgres, pki_files: PKI, tmp_path: Path
) -> None:
    """psql's Ctrl-C (libpq's ``PQcancel``) sends the CancelRequest on a new connection
    without TLS. A server tunnel admits nothing without TLS and a client certificate, so
    the query runs on: cancelling needs a client tunnel or libpq 17's encrypted cancel
    (test_libpq_cancels_a_query_through_tunnels)."""
    port = free_port()
    server = pg_server_doc(pki_files, port=port, target=address(postgres_server.port))
    with run_tunnel(tmp_path / "tunnel", server) as tunnel:
        argv = [postgres_tool("psql"), "-X", "-c", "SELECT pg_sleep(2)", to(port, **tls_params(pki_files))]
        with subprocess.Popen(
            argv, env=postgres_client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as process:
            wait_until_running(postgres_server, "SELECT pg_sleep(2)")
            before = cancellations(postgres_server)
            sent = time.monotonic()
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=20)
        assert "Cancel request sent" in err
        tunnel.wait_for_log(r"refused: no TLS \(a PostgreSQL CancelRequest in plaintext\) tunnel=pg-in ")
        assert time.monotonic() - sent > 1.5, err  # pg_sleep ran its course
        assert cancellations(postgres_server) == before
