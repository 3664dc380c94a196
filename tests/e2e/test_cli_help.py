"""The CLI as a newcomer meets it: help on -h, every option named in its errors, a
version that says what a bug report needs, and no failure that ends in a traceback."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import PKI, free_port, server_doc, write_yaml
from tests.process import TUNNEL


def tunnel(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNEL, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_answers_to_h_and_lists_every_command_untruncated(flag: str) -> None:
    result = tunnel(flag)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.split("Commands:")[1]
    for line in ("ca ", "check ", "run ", "status "):
        assert any(row.strip().startswith(line) for row in commands.splitlines()), result.stdout
    assert "..." not in commands  # click's mark of a truncated summary
    assert "crl" in result.stdout  # the ca summary names every subcommand
    assert "_TUNNEL_COMPLETE=bash_source tunnel" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "-h"], ["repeatable", "SIGHUP", "Example:"]),
        (["status", "-h"], ["127.0.0.1:9100", "Example:"]),
        (["ca", "issue", "-h"], ["--server is required", "--client is required", "Example:"]),
        (["ca", "init", "-h"], ["--parent", "Example:"]),
        (["check", "-h"], ["Example:"]),
    ],
)
def test_each_command_help_says_what_a_newcomer_needs(args: list[str], expected: list[str]) -> None:
    result = tunnel(*args)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout, result.stdout


def test_version_names_python_openssl_trio_and_cryptography() -> None:
    out = tunnel("--version").stdout
    assert out.startswith("tunnel 0.1.0\n")
    assert "Python 3." in out
    assert ssl.OPENSSL_VERSION in out
    assert "\ntrio " in out
    assert "\ncryptography " in out


def test_a_bad_status_address_names_the_option(tmp_path: Path) -> None:
    result = tunnel("run", "--status", "9100", "x.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "Invalid value for '--status'" in result.stderr


def test_status_health_with_no_daemon_prints_unavailable() -> None:
    result = tunnel("status", f"127.0.0.1:{free_port()}", "--health")
    assert result.returncode == 1
    assert result.stdout == "unavailable\n"
    assert result.stderr.startswith("error: no answer from")


@pytest.mark.parametrize("how", ["option", "file", "option-workers"])
def test_a_status_address_in_use_is_one_error_line_naming_where_it_came_from(
    pki_files: PKI, tmp_path: Path, busy_port: int, how: str
) -> None:
    status = f"127.0.0.1:{busy_port}"
    doc = server_doc(pki_files, "127.0.0.1:9", listen=f"127.0.0.1:{free_port()}")
    if how == "file":
        doc["status"] = status
    path = write_yaml(tmp_path / "s.yaml", doc)
    args = ["run", str(path)]
    if how.startswith("option"):
        args[1:1] = ["--status", status]
    if how == "option-workers":
        args[1:1] = ["--workers", "2"]
    result = tunnel(*args)
    assert result.returncode == 1, result.stderr
    where = f"--status {status}" if how.startswith("option") else f"{path}: status"
    assert f"error: {where}: cannot serve status on {status}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening tunnel=" not in result.stderr  # refused before any tunnel says it listens


def test_no_failure_of_the_cli_ends_in_a_traceback(pki_files: PKI, tmp_path: Path, busy_port: int) -> None:
    """Every way a newcomer can get it wrong: one `error:` line (or click's usage error),
    a non-zero exit, never a traceback."""
    (tmp_path / "bad.yaml").write_text("mode: [\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    good = write_yaml(tmp_path / "good.yaml", server_doc(pki_files, "127.0.0.1:9", listen=f"127.0.0.1:{busy_port}"))
    encrypted = tmp_path / "enc"
    encrypted.mkdir(mode=0o700)
    (encrypted / "p").write_text("pw\n")
    (encrypted / "p").chmod(0o600)
    failures = [
        ["nonsense"],
        ["run"],
        ["run", "missing.yaml"],
        ["run", "bad.yaml"],
        ["run", "empty"],
        ["run", str(good)],  # its port is taken
        ["run", "--status", "nope", str(good)],
        ["run", "--status", f"127.0.0.1:{busy_port}", "--workers", "2", str(good)],
        ["check", "bad.yaml"],
        ["check", "missing.yaml"],
        ["status", f"127.0.0.1:{free_port()}"],
        ["status", "unix:/nope"],
        ["ca", "issue", "--dir", "nowhere", "x", "--client"],
        ["ca", "issue", "--dir", "nowhere", "x"],
        ["ca", "show", "garbage.pem"],
        ["ca", "show", "missing.pem"],
        ["ca", "revoke", "--dir", str(pki_files.dir), "nobody-by-that-name"],
        ["ca", "init", "--dir", str(pki_files.dir)],  # exists
        ["ca", "init", "--dir", "sub", "--parent", "nowhere"],
        ["ca", "list", "--dir", "nowhere"],
        ["ca", "issue", "--dir", str(pki_files.dir), "y", "--client", "--key-password-file", "missing.pass"],
    ]
    for args in failures:
        result = tunnel(*args, cwd=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode != 0, (args, output)
        assert "Traceback" not in output, (args, output)
        assert "error" in output.lower(), (args, output)
