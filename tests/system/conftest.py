"""Fixtures for system tests against real redis-server, MariaDB, PostgreSQL and stunnel4.

Every test collected under tests/system gets the ``system`` marker, so
``pytest -m "not system"`` deselects them all.

Start-up cost measured on a 2-core VM: redis-server ~0.03 s start + ~0.11 s stop
(function scope, a fresh server per test); MariaDB ~0.8 s incl. ~0.55 s of
mariadb-install-db, ~0.03 s clean shutdown (session scope,
one server shared by the whole run; tests should use their own database, see
``mariadb_database``); PostgreSQL ~1 s incl. initdb (session scope, two clusters:
plaintext and TLS-only, each started only if a test asks for it).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PKI
from tests.system.services import (
    MariaDB,
    Postgres,
    PostgresTLS,
    Redis,
    mariadb_query,
    run_mariadb,
    run_postgres,
    run_redis,
    stunnel_binary,
)

_SYSTEM_DIR = Path(__file__).resolve().parent
_database_numbers = itertools.count(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Hooks in a sub-directory conftest still see every collected item:
    # only mark the ones that live under tests/system.
    for item in items:
        if _SYSTEM_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    """A fresh, empty redis-server on a free 127.0.0.1 port (no persistence)."""
    with run_redis(tmp_path / "redis") as redis:
        yield redis


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDB]:
    """One throwaway MariaDB for the session; TCP login tunnel/tunnel on 127.0.0.1."""
    with run_mariadb(tmp_path_factory.mktemp("mariadb")) as mariadb:
        yield mariadb


@pytest.fixture
def mariadb_database(mariadb_server: MariaDB) -> Iterator[str]:
    """Name of a new, empty database on the shared server; dropped afterwards."""
    name = f"t{next(_database_numbers)}"
    mariadb_query(mariadb_server.port, f"CREATE DATABASE `{name}`")
    yield name
    mariadb_query(mariadb_server.port, f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One throwaway PostgreSQL for the session taking plaintext TCP on 127.0.0.1 (trust);
    superuser ``app1``, database ``postgres``."""
    with run_postgres(tmp_path_factory.mktemp("postgres")) as postgres:
        yield postgres


@pytest.fixture(scope="session")
def postgres_tls_server(tmp_path_factory: pytest.TempPathFactory, pki_files: PKI) -> Iterator[Postgres]:
    """One throwaway PostgreSQL for the session taking only TLS on 127.0.0.1, with the
    test PKI's ``server`` certificate and client-certificate authentication against its
    CA (``hostssl all all 127.0.0.1/32 cert``: the client certificate's CN is the user)."""
    tls = PostgresTLS(cert=pki_files.crt("server"), key=pki_files.key("server"), ca=pki_files.ca)
    with run_postgres(tmp_path_factory.mktemp("postgres-tls"), tls) as postgres:
        yield postgres


@pytest.fixture(scope="session")
def stunnel_path() -> str:
    """Absolute path of the stunnel binary (skip/fail if stunnel4 is missing)."""
    return stunnel_binary()
