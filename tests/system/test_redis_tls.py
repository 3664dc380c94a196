"""The README's "Redis clients that speak TLS", run as written (its blocks are read from
README.md, with the ports moved to free ones) against a real redis-server: redis-cli
--tls straight to a server tunnel, and a client tunnel in front of a redis-server that
speaks TLS itself and requires client certificates."""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.system.services import (
    LOCALHOST,
    Redis,
    ServiceError,
    _poll,
    _process_alive,
    free_port,
    read_log,
    redis_cli,
    require_tool,
    stop_process,
)
from tests.system.test_redis import redis_connections
from tests.system.tunnel_process import TEST_LIMITS, run_tunnel, tunnel_command

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


# --------------------------------------------------------------------------- the README


def readme_section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_blocks(title: str) -> list[tuple[str, str, str]]:
    """The section's fenced blocks, in order: (language, body, the line before it)."""
    return [
        (kind, body, before)
        for before, kind, body in re.findall(r"(?s)([^\n]*)\n\n```(sh|yaml)\n(.*?)```", readme_section(title))
    ]


def moved(text: str, ports: dict[str, int]) -> str:
    """`text` with each README port (a key of `ports`) replaced by its free port."""
    pattern = r"\b(" + "|".join(map(re.escape, ports)) + r")\b"
    return re.sub(pattern, lambda m: str(ports[m.group(1)]), text)


def readme_yaml(title: str, filename: str, ports: dict[str, int]) -> dict[str, Any]:
    """The YAML block the sentence before it names as `filename`, ports moved."""
    for kind, body, before in readme_blocks(title):
        if kind == "yaml" and f"`{filename}`" in before:
            doc = yaml.safe_load(moved(body, ports))
            assert isinstance(doc, dict)
            return doc
    raise AssertionError(f"README section {title!r} has no YAML block for {filename}")


def readme_command(title: str, ports: dict[str, int], program: str, *, tls: bool = False) -> list[str]:
    """The argv of the section's one command line that runs `program` (with `--tls`, or
    without), ports moved."""
    commands = [
        shlex.split(line, comments=True)
        for kind, body, _ in readme_blocks(title)
        if kind == "sh"
        for line in moved(body, ports).splitlines()
    ]
    found = [argv for argv in commands if argv[:1] == [program] and ("--tls" in argv) == tls]
    assert len(found) == 1, (program, commands)
    return found[0]


TLS_SECTION = "Redis clients that speak TLS"


# --------------------------------------------------------------------------- set-up


def tunnel_ca(work: Path, *args: str) -> None:
    subprocess.run([*tunnel_command(), "ca", *args], cwd=work, check=True, capture_output=True, timeout=60)


def quickstart_ca(work: Path) -> Path:
    """The quick start's CA in work/ca (redis, app1), plus app2 (not in `allow`)."""
    work.mkdir(parents=True, exist_ok=True)
    tunnel_ca(work, "init", "--dir", "ca")
    tunnel_ca(work, "issue", "--dir", "ca", "redis", "--server", "--dns", "localhost", "--ip", "127.0.0.1")
    tunnel_ca(work, "issue", "--dir", "ca", "app1", "--client")
    tunnel_ca(work, "issue", "--dir", "ca", "app2", "--client")
    return work


def run_cli(argv: list[str], work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a README redis-cli command (its own arguments replaced by `args`, if given)."""
    cli = require_tool("redis-cli")
    command = [cli, *argv[1:]]
    if args:
        command = [*command[: len(command) - 1], *args]  # the README's last word is the command
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=15, check=False)


def tls_cli_argv(port: int) -> list[str]:
    """redis-cli --tls as app1 of work/ca, to 127.0.0.1:PORT (run in work)."""
    return [
        "redis-cli",
        "--tls",
        "--cert",
        "ca/app1.crt",
        "--key",
        "ca/app1.key",
        "--cacert",
        "ca/ca.crt",
        "-h",
        LOCALHOST,
        "-p",
        str(port),
        "ping",
    ]


@contextlib.contextmanager
def run_tls_redis(work: Path, argv: list[str], port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """The README's redis-server command (in `work`, so its ca/ paths hold), throwaway
    (127.0.0.1, no persistence); ready once redis-cli --tls as app1 gets PONG."""
    server = require_tool("redis-server")
    # fmt: off
    command = [
        server, *argv[1:], *extra,
        "--bind", LOCALHOST, "--save", "", "--appendonly", "no", "--dir", str(work),
        "--daemonize", "no", "--protected-mode", "no",
    ]
    # fmt: on
    log_path = work / "redis.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        try:
            _poll(
                lambda: run_cli(tls_cli_argv(port), work).stdout.strip() == "PONG",
                15.0,
                f"redis-server (TLS) on port {port} to answer PING",
                alive=_process_alive(process),
            )
        except ServiceError as exc:
            raise ServiceError(f"{exc}\n--- {log_path} ---\n{read_log(log_path)}") from None
        yield process
    finally:
        stop_process(process)


def tls_redis_connections(work: Path, port: int) -> int:
    result = run_cli(tls_cli_argv(port), work, "info", "stats")
    match = re.search(r"total_connections_received:(\d+)", result.stdout)
    assert match is not None, result
    return int(match.group(1))


# --------------------------------------------------------------------------- redis-cli --tls → server tunnel


def quickstart_server_tunnel(ports: dict[str, int]) -> dict[str, Any]:
    """The quick start's `redis-server.yaml` (allow: app1), its ports moved."""
    doc = readme_yaml("Quick start by hand", "redis-server.yaml", ports)
    doc.update(name="redis-server", limits=dict(TEST_LIMITS))
    return doc


def test_redis_cli_with_tls_talks_straight_to_a_server_tunnel(redis_server: Redis, tmp_path: Path) -> None:
    work = quickstart_ca(tmp_path / "work")
    ports = {"7391": free_port(), "6379": redis_server.port}
    server = quickstart_server_tunnel(ports)
    cli = readme_command(TLS_SECTION, ports, "redis-cli", tls=True)
    with run_tunnel(work, server) as tunnel:
        result = run_cli(cli, work)
        assert (result.returncode, result.stdout.strip()) == (0, "PONG"), result
        assert run_cli(cli, work, "set", "greeting", "hello over tls").stdout.strip() == "OK"
        assert run_cli(cli, work, "get", "greeting").stdout.strip() == "hello over tls"
        # ... and it really is in redis.
        assert redis_cli(redis_server.port, "get", "greeting") == "hello over tls"
        tunnel.wait_for_log(r"opened tunnel=redis-server .*identity=cn=app1 tls=TLSv1\.3")
        assert "refused" not in tunnel.log_text()


def test_redis_cli_with_a_certificate_allow_does_not_admit_is_refused_before_redis(
    redis_server: Redis, tmp_path: Path
) -> None:
    work = quickstart_ca(tmp_path / "work")
    ports = {"7391": free_port(), "6379": redis_server.port}
    server = quickstart_server_tunnel(ports)
    cli = readme_command(TLS_SECTION, ports, "redis-cli", tls=True)
    app2 = [word.replace("ca/app1.", "ca/app2.") for word in cli]
    assert app2 != cli
    before = redis_connections(redis_server.port)
    with run_tunnel(work, server) as tunnel:
        result = run_cli(app2, work)
        assert result.returncode != 0, result
        assert "PONG" not in result.stdout, result
        assert "Error" in result.stderr, result
        tunnel.wait_for_log(r"refused: not allowed: matches none of allow\.cn tunnel=redis-server .*identity=cn=app2")
        assert "opened" not in tunnel.log_text()
    # Redis saw only the INFO calls of redis_connections (this one included).
    assert redis_connections(redis_server.port) == before + 1


def test_redis_cli_without_a_certificate_is_refused_before_redis(redis_server: Redis, tmp_path: Path) -> None:
    work = quickstart_ca(tmp_path / "work")
    ports = {"7391": free_port(), "6379": redis_server.port}
    server = quickstart_server_tunnel(ports)
    cli = readme_command(TLS_SECTION, ports, "redis-cli", tls=True)
    at = cli.index("--cert")
    assert cli[at + 2] == "--key"
    anonymous = cli[:at] + cli[at + 4 :]
    before = redis_connections(redis_server.port)
    with run_tunnel(work, server) as tunnel:
        result = run_cli(anonymous, work)
        assert result.returncode != 0, result
        assert "PONG" not in result.stdout, result
        assert "Error" in result.stderr, result
        tunnel.wait_for_log(r"refused: no certificate tunnel=redis-server")
        assert "opened" not in tunnel.log_text()
    assert redis_connections(redis_server.port) == before + 1


# --------------------------------------------------------------------------- client tunnel → TLS redis


def tls_ports() -> dict[str, int]:
    return {"6389": free_port(), "7392": free_port()}


def client_tunnel_doc(ports: dict[str, int], name: str) -> dict[str, Any]:
    doc = readme_yaml(TLS_SECTION, "redis-tls-client.yaml", ports)
    doc.update(name=name, limits=dict(TEST_LIMITS))
    return doc


def ping_through(ports: dict[str, int], work: Path) -> subprocess.CompletedProcess[str]:
    """The README's plain `redis-cli -p 7392 ping`, to the client tunnel, in work."""
    return run_cli(readme_command(TLS_SECTION, ports, "redis-cli"), work)


def test_a_client_tunnel_reaches_a_redis_that_speaks_tls(tmp_path: Path) -> None:
    work = quickstart_ca(tmp_path / "work")
    ports = tls_ports()
    redis_argv = readme_command(TLS_SECTION, ports, "redis-server")
    client = client_tunnel_doc(ports, "tls-client")
    with run_tls_redis(work, redis_argv, ports["6389"]), run_tunnel(work, client) as tunnel:
        for _ in range(3):  # the first with a full handshake, the others resumed
            result = ping_through(ports, work)
            assert (result.returncode, result.stdout.strip()) == (0, "PONG"), result
        local = ports["7392"]
        assert redis_cli(local, "set", "greeting", "hello") == "OK"
        assert redis_cli(local, "get", "greeting") == "hello"
        assert run_cli(tls_cli_argv(ports["6389"]), work, "get", "greeting").stdout.strip() == "hello"
        tunnel.wait_for_log(r"opened tunnel=tls-client .*identity=cn=redis tls=TLSv1\.3 server=")
        tunnel.wait_for_log(r"opened tunnel=tls-client .*tls=TLSv1\.3 resumed server=")
        assert "refused" not in tunnel.log_text()


def test_a_client_tunnel_whose_certificate_redis_does_not_trust_is_refused_not_opened(tmp_path: Path) -> None:
    work = quickstart_ca(tmp_path / "work")
    tunnel_ca(work, "init", "--dir", "other", "--name", "other CA")
    tunnel_ca(work, "issue", "--dir", "other", "app1", "--client")
    # The tunnel's own certificate must chain to its tls.ca: it trusts both CAs.
    (work / "both.crt").write_bytes((work / "ca/ca.crt").read_bytes() + (work / "other/ca.crt").read_bytes())
    ports = tls_ports()
    doc = client_tunnel_doc(ports, "untrusted")
    doc["tls"].update(cert="other/app1.crt", key="other/app1.key", ca="both.crt")
    redis_argv = readme_command(TLS_SECTION, ports, "redis-server")
    with run_tls_redis(work, redis_argv, ports["6389"]), run_tunnel(work, doc) as tunnel:
        before = tls_redis_connections(work, ports["6389"])
        result = ping_through(ports, work)
        assert result.returncode != 0, result
        assert "PONG" not in result.stdout, result
        tunnel.wait_for_log(
            rf"refused: refused by server: unknown ca tunnel=untrusted .*server=127\.0\.0\.1:{ports['6389']}"
        )
        assert "opened" not in tunnel.log_text()
        # Redis accepted the TCP connection, refused the handshake, and never had a client.
        assert tls_redis_connections(work, ports["6389"]) == before + 1
        assert "certificate verify failed" in read_log(work / "redis.log")


def test_a_client_tunnel_keeps_working_with_a_tls_redis_that_caches_no_sessions(tmp_path: Path) -> None:
    """redis-server --tls-session-caching no sends TLS 1.3 session tickets but sets no
    session ID context, so OpenSSL fails every handshake that offers one back ("session
    id context uninitialized" in redis's log, `internal error` to the client). Every
    connection after the first through the client tunnel used to be refused."""
    work = quickstart_ca(tmp_path / "work")
    ports = tls_ports()
    redis_argv = readme_command(TLS_SECTION, ports, "redis-server")
    with (
        run_tls_redis(work, redis_argv, ports["6389"], "--tls-session-caching", "no"),
        run_tunnel(work, client_tunnel_doc(ports, "tls-client")) as tunnel,
    ):
        for _ in range(4):
            result = ping_through(ports, work)
            assert (result.returncode, result.stdout.strip()) == (0, "PONG"), result
        tunnel.wait_for_log(r"resumption refused tunnel=tls-client server=\S+: refused by server: internal error")
        log = tunnel.log_text()
        assert log.count("resumption refused") == 1, log
        assert log.count("opened tunnel=tls-client") == 4, log
        assert "refused:" not in log, log
