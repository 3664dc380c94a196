"""Start and stop real third-party services for system tests.

Plain synchronous, subprocess-based helpers (no trio): redis-server, MariaDB,
PostgreSQL and stunnel4, each bound to a free port on 127.0.0.1 and living in a
caller-supplied temporary directory.

Missing software: :func:`require_tool` skips the test, unless ``CI=true`` or
``TUNNEL_REQUIRE_SYSTEM=1`` is set, in which case it fails the test, so CI can
never silently skip the system tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

LOCALHOST = "127.0.0.1"

#: Debian package providing each tool we may look for.
DEBIAN_PACKAGES: dict[str, str] = {
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
    "redis-benchmark": "redis-tools",
    "mariadbd": "mariadb-server",
    "mysqld": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mysql_install_db": "mariadb-server",
    "mariadb": "mariadb-client",
    "mysql": "mariadb-client",
    "stunnel4": "stunnel4",
    "stunnel": "stunnel4",
    "initdb": "postgresql",
    "postgres": "postgresql",
    "psql": "postgresql-client",
    "pgbench": "postgresql-client",
    "promtool": "prometheus",
}

#: Directories searched in addition to $PATH (daemons live in /usr/sbin, which is
#: often not on a non-root user's $PATH).
_EXTRA_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")

#: Credentials of the TCP user created in every throwaway MariaDB.
MARIADB_USER = "tunnel"
MARIADB_PASSWORD = "tunnel"

# AF_UNIX sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_PATH = 100


class ServiceError(RuntimeError):
    """A service failed to start, become ready, or answer."""


# --------------------------------------------------------------------------- tools


def system_tests_required() -> bool:
    """True when missing system software must fail (not skip) the tests."""
    return (
        os.environ.get("CI", "").strip().lower() == "true" or os.environ.get("TUNNEL_REQUIRE_SYSTEM", "").strip() == "1"
    )


def find_tool(name: str) -> str | None:
    """Absolute path of ``name`` on $PATH or in the usual system dirs, else None."""
    found = shutil.which(name)
    if found is not None:
        return os.path.abspath(found)
    for directory in _EXTRA_DIRS:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_tool(name: str, *alternatives: str) -> str:
    """Return the absolute path of ``name`` (or of the first alternative found).

    If none is installed: ``pytest.fail`` when :func:`system_tests_required`,
    otherwise ``pytest.skip``; the message names the Debian package to install.
    """
    for candidate in (name, *alternatives):
        path = find_tool(candidate)
        if path is not None:
            return path
    names = " / ".join((name, *alternatives))
    package = DEBIAN_PACKAGES.get(name, name)
    message = f"{names} not found: install the Debian package {package!r} (apt-get install {package})"
    if system_tests_required():
        pytest.fail(f"{message} [CI=true or TUNNEL_REQUIRE_SYSTEM=1: refusing to skip]")
    pytest.skip(message)


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _poll(
    ready: Callable[[], bool],
    timeout: float,
    describe: str,
    alive: Callable[[], str | None] | None = None,
    interval: float = 0.02,
) -> None:
    """Call ``ready`` until it returns True; raise ServiceError on timeout.

    ``alive`` (optional) returns an error text once the thing we wait for is known
    to be dead (e.g. its process exited), to fail fast instead of timing out.
    """
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        if alive is not None:
            problem = alive()
            if problem is not None:
                raise ServiceError(f"{describe}: {problem}")
        if time.monotonic() >= deadline:
            raise ServiceError(f"timed out after {timeout:.1f}s waiting for {describe}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def port_connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until a TCP connect to host:port succeeds (retry loop).

    Note that this really connects: the server sees (and may log or forward) one
    empty connection. If ``process`` is given, fail fast when it exits.
    """
    _poll(
        lambda: port_connectable(host, port),
        timeout,
        f"TCP port {host}:{port} to accept connections",
        alive=_process_alive(process),
    )


def unix_socket_connectable(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            return True
    except OSError:
        return False


def wait_for_unix_socket(
    path: Path,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until the unix socket at ``path`` exists and accepts a connection."""
    _poll(
        lambda: unix_socket_connectable(path),
        timeout,
        f"unix socket {path} to accept connections",
        alive=_process_alive(process),
    )


def _process_alive(
    process: subprocess.Popen[bytes] | None,
) -> Callable[[], str | None] | None:
    if process is None:
        return None

    def check() -> str | None:
        code = process.poll()
        return None if code is None else f"process {process.args!r} exited with status {code}"

    return check


# --------------------------------------------------------------------------- processes


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process, wait up to ``timeout`` seconds, then SIGKILL and reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()


def read_log(path: Path, limit: int = 8000) -> str:
    """The last ``limit`` characters of a log file ('' if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


# --------------------------------------------------------------------------- redis


@dataclass
class Redis:
    port: int
    process: subprocess.Popen[bytes]
    host: str = LOCALHOST


def redis_benchmark(port: int, *, requests: int, clients: int = 50) -> tuple[dict[str, float], str]:
    """``redis-benchmark -t get,set -q`` against 127.0.0.1:PORT: ({test: requests/s}, its output)."""
    benchmark = require_tool("redis-benchmark")
    argv = [benchmark, "-h", LOCALHOST, "-p", str(port), "-n", str(requests), "-c", str(clients), "-t", "get,set", "-q"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    # -q prints lines like "SET: 41666.67 requests per second, p50=0.055 msec"
    # (with \r-separated progress updates before each final line).
    rates = {
        m.group(1): float(m.group(2)) for m in re.finditer(r"([A-Z]+): ([0-9.]+) requests per second", result.stdout)
    }
    return rates, result.stdout + result.stderr


def redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """Run ``redis-cli -h 127.0.0.1 -p PORT ARGS...``; return stdout (stripped)."""
    cli = require_tool("redis-cli")
    result = subprocess.run(
        [cli, "-h", LOCALHOST, "-p", str(port), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"redis-cli {' '.join(args)} failed ({result.returncode}): "
            f"{result.stderr.decode(errors='replace')}{result.stdout.decode(errors='replace')}"
        )
    return result.stdout.decode(errors="replace").strip()


def _redis_pong(port: int) -> bool:
    try:
        return redis_cli(port, "ping", timeout=2.0) == "PONG"
    except (ServiceError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def run_redis(tmp: Path, timeout: float = 15.0) -> Iterator[Redis]:
    """Run a throwaway redis-server on a free 127.0.0.1 port (no persistence)."""
    server = require_tool("redis-server")
    require_tool("redis-cli")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = tmp / "redis.log"
    # fmt: off
    argv = [
        server,
        "--port", str(port),
        "--bind", LOCALHOST,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(tmp),
        "--daemonize", "no",
        "--protected-mode", "no",
    ]
    # fmt: on
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        try:
            _poll(
                lambda: _redis_pong(port),
                timeout,
                f"redis-server on port {port} to answer PING",
                alive=_process_alive(process),
            )
        except ServiceError as exc:
            raise ServiceError(f"{exc}\n--- {log_path} ---\n{read_log(log_path)}") from None
        yield Redis(port=port, process=process)
    finally:
        stop_process(process)


# --------------------------------------------------------------------------- mariadb


@dataclass
class MariaDB:
    port: int
    socket: Path
    process: subprocess.Popen[bytes]
    datadir: Path
    log: Path
    host: str = LOCALHOST
    user: str = MARIADB_USER
    password: str = MARIADB_PASSWORD


# Options shared by mariadb-install-db (which passes them on to its bootstrap
# mariadbd) and the server itself: keep it small and fast.
_MARIADB_LIGHT_OPTIONS = (
    "--skip-log-bin",
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=8M",  # default 96M: writing it dominates init time
)


def _short_socket_dir(tmp: Path) -> Path | None:
    """None if ``tmp/mysql.sock`` fits in sun_path, else a new short temp dir."""
    if len(os.fsencode(tmp / "mysql.sock")) <= _MAX_UNIX_PATH:
        return None
    # Deep pytest tmp dirs can exceed sun_path's limit; fall back to a short dir.
    return Path(tempfile.mkdtemp(prefix="tunnel-mdb-"))


def mariadb_client_argv(
    port: int,
    *,
    user: str = MARIADB_USER,
    password: str = MARIADB_PASSWORD,
    connect_timeout: int = 5,
    host: str = LOCALHOST,
) -> list[str]:
    """argv prefix for the ``mariadb`` client over plaintext TCP to host:port.

    ``--skip-ssl``: the 10.11 client defaults to ``ssl=TRUE`` (opportunistic TLS,
    used whenever the server offers it); force the plain MySQL protocol.
    """
    client = require_tool("mariadb", "mysql")
    return [
        client,
        "--no-defaults",
        f"--host={host}",
        f"--port={port}",
        "--protocol=TCP",
        f"--user={user}",
        f"--password={password}",
        "--skip-ssl",
        f"--connect-timeout={connect_timeout}",
        "--batch",
        "--skip-column-names",
    ]


def mariadb_query(
    port: int,
    sql: str,
    *,
    user: str = MARIADB_USER,
    password: str = MARIADB_PASSWORD,
    database: str | None = None,
    connect_timeout: int = 5,
    timeout: float = 30.0,
    host: str = LOCALHOST,
) -> str:
    """Run ``sql`` with the ``mariadb`` client over TCP; return its stdout.

    Raises ServiceError (including the client's stderr) on failure.
    """
    argv = mariadb_client_argv(port, user=user, password=password, connect_timeout=connect_timeout, host=host)
    if database is not None:
        argv.append(f"--database={database}")
    argv += ["--execute", sql]
    try:
        result = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"mariadb client timed out after {timeout}s running {sql!r}") from exc
    if result.returncode != 0:
        raise ServiceError(
            f"mariadb client failed ({result.returncode}) on {host}:{port} running {sql!r}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode(errors="replace")


def _mariadb_socket_sql(sock: Path, sql: str, timeout: float = 30.0) -> None:
    """Run ``sql`` as the passwordless root user over the unix socket."""
    client = require_tool("mariadb", "mysql")
    argv = [client, "--no-defaults", "--protocol=SOCKET", f"--socket={sock}", "--user=root"]
    result = subprocess.run([*argv, "--execute", sql], capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise ServiceError(
            f"mariadb (root over {sock}) failed ({result.returncode}) running {sql!r}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )


def _mariadb_tcp_ready(port: int) -> bool:
    try:
        return mariadb_query(port, "SELECT 1", connect_timeout=2, timeout=5.0).strip() == "1"
    except ServiceError:
        return False


@contextlib.contextmanager
def run_mariadb(tmp: Path, timeout: float = 60.0) -> Iterator[MariaDB]:
    """Run a throwaway MariaDB (fresh datadir under ``tmp``) on a free port.

    A user ``tunnel``/``tunnel`` with all privileges is created for TCP logins
    (root@localhost over the unix socket has no password too).
    """
    server = require_tool("mariadbd", "mysqld")
    install_db = require_tool("mariadb-install-db", "mysql_install_db")
    require_tool("mariadb", "mysql")
    tmp.mkdir(parents=True, exist_ok=True)
    datadir = tmp / "data"
    error_log = tmp / "mariadb.err"
    install_log = tmp / "install-db.log"

    install = subprocess.run(
        [
            install_db,
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--user=root",
            "--skip-test-db",
            *_MARIADB_LIGHT_OPTIONS,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    install_log.write_bytes(install.stdout)
    if install.returncode != 0:
        raise ServiceError(
            f"{install_db} failed ({install.returncode}):\n{install.stdout.decode(errors='replace')[-8000:]}"
        )

    port = free_port()
    short_dir = _short_socket_dir(tmp)
    sock = (short_dir or tmp) / "mysql.sock"
    argv = [
        server,
        "--no-defaults",  # must come first
        f"--datadir={datadir}",
        f"--port={port}",
        f"--bind-address={LOCALHOST}",
        f"--socket={sock}",
        "--user=root",
        f"--pid-file={tmp / 'mariadb.pid'}",
        f"--log-error={error_log}",
        *_MARIADB_LIGHT_OPTIONS,
    ]
    with open(tmp / "mariadbd.out", "wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        try:
            deadline = time.monotonic() + timeout
            wait_for_unix_socket(sock, timeout, process)
            _mariadb_socket_sql(
                sock,
                f"CREATE USER '{MARIADB_USER}'@'%' IDENTIFIED BY '{MARIADB_PASSWORD}'; "
                f"GRANT ALL PRIVILEGES ON *.* TO '{MARIADB_USER}'@'%';",
            )
            _poll(
                lambda: _mariadb_tcp_ready(port),
                max(deadline - time.monotonic(), 1.0),
                f"mariadbd to answer SELECT 1 over TCP port {port}",
                alive=_process_alive(process),
            )
        except ServiceError as exc:
            raise ServiceError(f"{exc}\n--- {error_log} ---\n{read_log(error_log)}") from None
        yield MariaDB(port=port, socket=sock, process=process, datadir=datadir, log=error_log)
    finally:
        # SIGTERM is a clean shutdown for mariadbd; give InnoDB time to flush.
        stop_process(process, timeout=30.0)
        if short_dir is not None:
            shutil.rmtree(short_dir, ignore_errors=True)


# --------------------------------------------------------------------------- postgresql

#: The database user of every throwaway PostgreSQL (initdb's bootstrap superuser). It is
#: the CN of the test PKI's client certificate ``app1`` too, as ``cert`` authentication
#: requires (PostgreSQL documentation, "Client Authentication", "Certificate Authentication").
POSTGRES_USER = "app1"
POSTGRES_DATABASE = "postgres"

#: Accounts PostgreSQL runs as when the tests run as root (initdb and postgres refuse to).
_POSTGRES_ACCOUNTS = ("postgres", "nobody")

_POSTGRES_DIR_GLOB = "/usr/lib/postgresql/*/bin"


def _postgres_version(bin_dir: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", Path(bin_dir).parent.name))


def postgres_tool(name: str) -> str:
    """Absolute path of a PostgreSQL program (``initdb``, ``postgres``, ``psql``, ``pgbench``).

    Debian keeps them in /usr/lib/postgresql/VERSION/bin (the server's are not on $PATH;
    /usr/bin/psql is a wrapper script that picks a version): the newest version there,
    else :func:`require_tool` (skip or fail naming the Debian package).
    """
    for bin_dir in sorted(glob.glob(_POSTGRES_DIR_GLOB), key=_postgres_version, reverse=True):
        candidate = os.path.join(bin_dir, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return require_tool(name)


@dataclass(frozen=True)
class PostgresTLS:
    """``ssl = on`` with these PEM files (copied for the server). pg_hba.conf then admits
    TCP only as ``hostssl all all 127.0.0.1/32 cert``: TLS with a client certificate
    issued under ``ca`` whose CN is the database user."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class Postgres:
    port: int
    socket_dir: Path
    process: subprocess.Popen[bytes]
    datadir: Path
    log: Path
    tls: bool
    host: str = LOCALHOST
    user: str = POSTGRES_USER
    database: str = POSTGRES_DATABASE

    def query(self, sql: str, *, database: str | None = None, timeout: float = 30.0) -> str:
        """Run ``sql`` over the unix socket (``trust``) in ``database`` (default
        ``postgres``); its rows, ``|``-separated, stripped. Raises ServiceError with
        psql's stderr on failure."""
        where = conninfo(host=self.socket_dir, port=self.port, user=self.user, dbname=database or self.database)
        result = psql(where, sql, timeout=timeout)
        if result.returncode != 0:
            raise ServiceError(f"psql over {self.socket_dir} failed ({result.returncode}) on {sql!r}: {result.stderr}")
        return result.stdout.strip()

    def tcp_connections(self) -> int:
        """How many TCP connections PostgreSQL has accepted (``log_connections``' lines
        ``connection received: host=127.0.0.1``; the unix socket's say ``host=[local]``)."""
        return read_log(self.log, limit=10**9).count(f"connection received: host={LOCALHOST} ")


def conninfo(**params: str | int | Path) -> str:
    """A libpq connection string ``key='value' ...`` (PostgreSQL documentation, libpq,
    "Connection Strings": single quotes, with backslash escaping ``'`` and ``\\``)."""

    def quoted(value: str | int | Path) -> str:
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{key}={quoted(value)}" for key, value in params.items())


def postgres_client_env(**extra: str) -> dict[str, str]:
    """The environment for psql/pgbench: ours without any ``PG*`` variable (a stray
    PGSSLMODE or PGHOST would change what is tested), ``PGCONNECT_TIMEOUT=5``, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    env.update(extra)
    return env


def psql(connection: str, sql: str, *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``psql -X -At -v ON_ERROR_STOP=1 -c SQL CONNECTION``: no ~/.psqlrc, rows unaligned
    without headers. The return code is not checked: look at ``returncode``/``stderr``."""
    argv = [postgres_tool("psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, connection]
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, env=postgres_client_env()
        )
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(f"psql timed out after {timeout}s on {connection!r} running {sql!r}") from exc


def _postgres_account() -> pwd.struct_passwd | None:
    """None when not root; else the account to run initdb and postgres as."""
    if os.geteuid() != 0:
        return None
    for name in _POSTGRES_ACCOUNTS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServiceError(f"running as root, and none of the accounts {_POSTGRES_ACCOUNTS} exists to run PostgreSQL as")


@dataclass(frozen=True)
class _RunAs:
    """subprocess's ``user``, ``group`` and ``extra_groups``: all None, as we are."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None


def _as_account(account: pwd.struct_passwd | None) -> _RunAs:
    if account is None:
        return _RunAs()
    return _RunAs(account.pw_uid, account.pw_gid, [])


def _give(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def _private_dir(tmp: Path, account: pwd.struct_passwd | None) -> tuple[Path, bool]:
    """Where the data directory and the unix socket go, and whether it is ours to delete:
    ``tmp/pg`` when it will do, else a new short directory under /tmp (pytest's tmp is
    closed to other users, and a deep one would not fit the socket path in sun_path)."""
    inside = tmp / "pg"
    if account is None and len(os.fsencode(inside / ".s.PGSQL.65535")) <= _MAX_UNIX_PATH:
        inside.mkdir()
        return inside, False
    short = Path(tempfile.mkdtemp(prefix="tunnel-pg-"))
    _give(short, account)
    return short, True


def _hba(tls: PostgresTLS | None) -> str:
    """pg_hba.conf: the unix socket trusted (the fixture's own queries); TCP plaintext
    trusted, or (``tls``) TLS-only with certificate authentication."""
    tcp = "hostssl all all 127.0.0.1/32 cert" if tls is not None else "host all all 127.0.0.1/32 trust"
    return f"local all all trust\n{tcp}\n"


def _stop_postgres(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGINT is PostgreSQL's "fast" shutdown (SIGTERM's "smart" one waits for every
    client to leave): postgres(1), "Signals". SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()


@contextlib.contextmanager
def run_postgres(tmp: Path, tls: PostgresTLS | None = None, timeout: float = 60.0) -> Iterator[Postgres]:
    """Run a throwaway PostgreSQL (fresh ``initdb``) on a free 127.0.0.1 port.

    Superuser :data:`POSTGRES_USER`, database ``postgres``; the unix socket trusted; TCP
    plaintext trusted, or with ``tls`` TLS-only with client-certificate authentication
    (see :class:`PostgresTLS`). ``log_connections`` is on (see
    :meth:`Postgres.tcp_connections`); durability is off (``fsync``, ``full_page_writes``).
    As root, initdb and postgres run as the ``postgres`` account (else ``nobody``), as
    both refuse to run as root.
    """
    initdb = postgres_tool("initdb")
    server = postgres_tool("postgres")
    postgres_tool("psql")
    tmp.mkdir(parents=True, exist_ok=True)
    account = _postgres_account()
    private, owned = _private_dir(tmp, account)
    try:
        datadir = private / "data"
        run_as = _as_account(account)
        init = subprocess.run(
            [initdb, "-D", str(datadir), "-U", POSTGRES_USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            user=run_as.user,
            group=run_as.group,
            extra_groups=run_as.extra_groups,
        )
        (tmp / "initdb.log").write_bytes(init.stdout)
        if init.returncode != 0:
            raise ServiceError(f"{initdb} failed ({init.returncode}):\n{init.stdout.decode(errors='replace')[-8000:]}")
        hba = private / "pg_hba.conf"
        hba.write_text(_hba(tls))
        _give(hba, account)
        port = free_port()
        # fmt: off
        settings = [
            f"port={port}",
            f"listen_addresses={LOCALHOST}",
            f"unix_socket_directories={private}",
            f"hba_file={hba}",
            "fsync=off",
            "full_page_writes=off",
            "synchronous_commit=off",
            "log_connections=on",
            "logging_collector=off",
            "shared_buffers=16MB",
            "max_connections=40",
        ]
        # fmt: on
        if tls is not None:
            for name, source in (("server.crt", tls.cert), ("server.key", tls.key), ("ca.crt", tls.ca)):
                shutil.copyfile(source, private / name)
                (private / name).chmod(0o600)  # postgres refuses a key others can read
                _give(private / name, account)
            settings += [
                "ssl=on",
                f"ssl_cert_file={private / 'server.crt'}",
                f"ssl_key_file={private / 'server.key'}",
                f"ssl_ca_file={private / 'ca.crt'}",
            ]
        log_path = tmp / "postgres.log"
        argv = [server, "-D", str(datadir)]
        for setting in settings:
            argv += ["-c", setting]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=run_as.user,
                group=run_as.group,
                extra_groups=run_as.extra_groups,
            )
        postgres = Postgres(
            port=port, socket_dir=private, process=process, datadir=datadir, log=log_path, tls=tls is not None
        )
        try:
            try:
                _poll(
                    lambda: _postgres_ready(postgres),
                    timeout,
                    f"postgres to answer SELECT 1 over its unix socket in {private}",
                    alive=_process_alive(process),
                )
            except ServiceError as exc:
                raise ServiceError(f"{exc}\n--- {log_path} ---\n{read_log(log_path)}") from None
            yield postgres
        finally:
            _stop_postgres(process)
    finally:
        if owned:
            shutil.rmtree(private, ignore_errors=True)


def _postgres_ready(postgres: Postgres) -> bool:
    if not (postgres.socket_dir / f".s.PGSQL.{postgres.port}").exists():
        return False
    try:
        return postgres.query("SELECT 1", timeout=5.0) == "1"
    except ServiceError:
        return False


# --------------------------------------------------------------------------- stunnel


def stunnel_binary() -> str:
    """Absolute path of stunnel (Debian: ``stunnel4``, ``stunnel`` is a symlink)."""
    return require_tool("stunnel4", "stunnel")


_ACCEPT_RE = re.compile(r"^\s*accept\s*=\s*(?:(?P<host>[^\s:]+|\[[^\]]*\]):)?(?P<port>\d+)\s*$")
_GLOBAL_KEY_RE = re.compile(r"^\s*(?P<key>[A-Za-z]+)\s*=")


def stunnel_accept_ports(config_text: str) -> list[tuple[str, int]]:
    """Every ``accept = [HOST:]PORT`` in a stunnel config (host defaults to 127.0.0.1)."""
    found: list[tuple[str, int]] = []
    for line in config_text.splitlines():
        match = _ACCEPT_RE.match(line)
        if match is None:
            continue
        host = (match.group("host") or LOCALHOST).strip("[]")
        if host in ("0.0.0.0", "::", "*"):
            host = LOCALHOST
        found.append((host, int(match.group("port"))))
    return found


def _global_keys(config_text: str) -> set[str]:
    """Option names set in the global section (before the first ``[service]``)."""
    keys: set[str] = set()
    for line in config_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            break
        match = _GLOBAL_KEY_RE.match(stripped)
        if match is not None:
            keys.add(match.group("key").lower())
    return keys


def stunnel_config(tmp: Path, config_text: str) -> str:
    """The full config: our global defaults, then the caller's text.

    Always ``foreground = yes`` and ``pid =`` (no pid file); ``debug = 4`` and
    ``output = TMP/stunnel.log`` unless the caller's global section sets them.
    """
    given = _global_keys(config_text)
    lines = ["; written by tests/system/services.py", "foreground = yes", "pid ="]
    if "debug" not in given:
        lines.append("debug = 4")
    if "output" not in given:
        lines.append(f"output = {tmp / 'stunnel.log'}")
    return "\n".join(lines) + "\n\n" + config_text.strip("\n") + "\n"


def _stunnel_log_path(full_config: str, tmp: Path) -> Path:
    for line in full_config.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "output":
            return Path(value.strip())
    return tmp / "stunnel.log"


@contextlib.contextmanager
def run_stunnel(tmp: Path, config_text: str, timeout: float = 15.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run stunnel in the foreground with ``config_text`` (the service sections).

    Waits until every ``accept = 127.0.0.1:PORT`` is connectable (one empty
    connection per port, which stunnel logs and forwards/handshakes as usual).
    On failure the error includes the stunnel log.
    """
    binary = stunnel_binary()
    tmp.mkdir(parents=True, exist_ok=True)
    full_config = stunnel_config(tmp, config_text)
    config_path = tmp / "stunnel.conf"
    config_path.write_text(full_config)
    log_path = _stunnel_log_path(full_config, tmp)
    stderr_path = tmp / "stunnel.stderr"
    with open(stderr_path, "wb") as err:
        process = subprocess.Popen([binary, str(config_path)], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        try:
            deadline = time.monotonic() + timeout
            for host, port in stunnel_accept_ports(full_config):
                wait_for_port(host, port, max(deadline - time.monotonic(), 0.5), process)
        except ServiceError as exc:
            raise ServiceError(
                f"stunnel did not become ready: {exc}\n"
                f"--- {config_path} ---\n{full_config}"
                f"--- {log_path} ---\n{read_log(log_path)}\n"
                f"--- {stderr_path} ---\n{read_log(stderr_path)}"
            ) from None
        yield process
    finally:
        stop_process(process)
