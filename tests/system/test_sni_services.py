"""Three server tunnels on one port, chosen by SNI, in front of a real Redis, a real
PostgreSQL and an echo target, run by the real daemon (`tunnel run DIR`): reached by
name with redis-cli, psql and a TLS client; an unknown name refused; one tunnel removed
by a reload while the others keep their open connections."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import helpers
from tests.helpers import PKI
from tests.system.services import LOCALHOST, Postgres, Redis, conninfo, free_port, psql, require_tool
from tests.system.tunnel_process import TEST_LIMITS, tunnel_command
from tunnel import pki

README = Path(__file__).resolve().parents[2] / "README.md"
NAMES = {"redis": "redis.internal", "pg": "pg.internal", "echo": "echo.internal"}


def _server_cert(p: PKI, name: str) -> tuple[str, str]:
    stem = "sni-" + name.replace(".", "-")
    if not p.crt(stem).exists():
        pki.issue(p.dir, stem, kind="server", dns=[name])
    return str(p.crt(stem)), str(p.key(stem))


def readme_doc(p: PKI, name: str, port: int, target: str) -> dict[str, Any]:
    """The README's tunnel file for `name` (section "Several services on one port"),
    with the test's port, target and certificates: its name, sni, protocol and allow as
    written there."""
    section = README.read_text().split("\n## Several services on one port (SNI)\n", 1)[1].split("\n## ", 1)[0]
    for body in re.findall(r"(?s)```yaml\n(.*?)```", section):
        doc = yaml.safe_load(body)
        if doc["name"] == name:
            ours = _doc(p, name, port, target)
            doc.update(listen=ours["listen"], target=target, tls=ours["tls"], limits=ours["limits"])
            assert isinstance(doc, dict)
            return doc
    raise AssertionError(f"no tunnel file named {name} in the README's SNI section")


def _doc(p: PKI, name: str, port: int, target: str, **extra: Any) -> dict[str, Any]:
    cert, key = _server_cert(p, NAMES[name])
    doc = helpers.server_doc(p, target, listen=f"{LOCALHOST}:{port}", name=name, limits=dict(TEST_LIMITS))
    doc["tls"].update(cert=cert, key=key)
    doc["sni"] = [NAMES[name]]
    doc.update(extra)
    return doc


@contextlib.contextmanager
def echo_target() -> Iterator[int]:
    port = free_port()
    code = (
        "import socket,threading\n"
        f"s=socket.create_server(('{LOCALHOST}',{port}))\n"
        "def serve(c):\n"
        "    with c:\n"
        "        while (d:=c.recv(65536)): c.sendall(d)\n"
        "while True:\n"
        "    c,_=s.accept(); threading.Thread(target=serve,args=(c,),daemon=True).start()\n"
    )
    process = subprocess.Popen(["python3", "-c", code])
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((LOCALHOST, port), timeout=1):
                break
            assert time.monotonic() < deadline, "the echo target did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait()


def _wait_for(log: Path, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log.read_text(errors='replace')}"
        time.sleep(0.05)


def _tls(p: PKI, port: int, name: str, alpn: list[str] | None = None) -> ssl.SSLSocket:
    ctx = p.client_context("app1")
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection((LOCALHOST, port), timeout=10)
    try:
        return ctx.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise


def _round_trip(sock: ssl.SSLSocket, data: bytes, expect: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(expect):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    assert got == expect


def test_three_tunnels_on_one_port_reached_by_name_and_one_removed_by_reload(
    tmp_path: Path, pki_files: PKI, redis_server: Redis, postgres_server: Postgres
) -> None:
    redis_cli = require_tool("redis-cli")
    port = free_port()
    conf = tmp_path / "tunnels"
    conf.mkdir()
    with echo_target() as echo_port:
        docs = {
            "redis": readme_doc(pki_files, "redis", port, f"{LOCALHOST}:{redis_server.port}"),
            "pg": readme_doc(pki_files, "pg", port, f"{LOCALHOST}:{postgres_server.port}"),
            "echo": _doc(pki_files, "echo", port, f"{LOCALHOST}:{echo_port}"),
        }
        for name, doc in docs.items():
            helpers.write_yaml(conf / f"{name}.yaml", doc)
        log = tmp_path / "tunnel.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen([*tunnel_command(), "run", str(conf)], stdout=out, stderr=out)
        try:
            _wait_for(log, "ready tunnels=3")
            tls = [
                "--cacert",
                str(pki_files.ca),
                "--cert",
                str(pki_files.crt("app1")),
                "--key",
                str(pki_files.key("app1")),
            ]
            redis = [redis_cli, "--tls", "--sni", "redis.internal", *tls, "-h", LOCALHOST, "-p", str(port)]
            stored = subprocess.run([*redis, "SET", "k", "v"], capture_output=True, text=True, timeout=10)
            assert stored.stdout.strip() == "OK", stored.stderr
            pg = conninfo(
                host="pg.internal",
                hostaddr=LOCALHOST,
                port=port,
                user=postgres_server.user,
                dbname=postgres_server.database,
                sslmode="verify-full",
                sslcert=pki_files.crt("app1"),
                sslkey=pki_files.key("app1"),
                sslrootcert=pki_files.ca,
            )
            result = psql(pg, "SELECT 40 + 2")
            assert (result.returncode, result.stdout.strip()) == (0, "42"), result.stderr
            echo = _tls(pki_files, port, "echo.internal")
            _round_trip(echo, b"hello", b"hello")
            held_redis = _tls(pki_files, port, "redis.internal")
            _round_trip(held_redis, b"PING\r\n", b"+PONG\r\n")

            with pytest.raises(ssl.SSLError, match=r"(?i)unrecognized.name"):
                _tls(pki_files, port, "nobody.internal").close()
            _wait_for(log, "refused: unknown server name (SNI 'nobody.internal'")

            (conf / "pg.yaml").unlink()
            daemon.send_signal(signal.SIGHUP)
            _wait_for(log, "reloaded tunnels=2")
            _round_trip(echo, b"still here", b"still here")  # open connections go on
            _round_trip(held_redis, b"GET k\r\n", b"$1\r\nv\r\n")
            assert psql(pg, "SELECT 1").returncode != 0  # its name is unknown now
            _wait_for(log, "refused: unknown server name")
            again = subprocess.run([*redis, "GET", "k"], capture_output=True, text=True, timeout=10)
            assert again.stdout.strip() == "v"  # the address was never rebound
            echo.close()
            held_redis.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=20)
        assert daemon.returncode == 0, log.read_text()
        assert "listening tunnel=redis" in log.read_text()
