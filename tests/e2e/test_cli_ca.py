"""End-to-end tests of `tunnel ca ...`, run as the real console script in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

_SCRIPT = Path(sys.executable).with_name("tunnel")
TUNNEL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "tunnel.cli"]


def tunnel(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TUNNEL, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(*args: str | Path, cwd: Path) -> str:
    result = tunnel(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def list_rows(cwd: Path) -> dict[str, list[str]]:
    lines = ok("ca", "list", cwd=cwd).splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SERIAL", "EXPIRES", "STATUS"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """A working directory with a CA initialised in the default ./certs."""
    out = ok("ca", "init", cwd=tmp_path)
    assert "certs/ca.crt" in out
    assert "certs/ca.key" in out
    assert "certs/crl.pem" in out
    return tmp_path


def test_version(tmp_path: Path) -> None:
    assert "0.1.0" in ok("--version", cwd=tmp_path)


def test_init_issue_list_revoke_show(ca: Path) -> None:
    certs = ca / "certs"
    assert (certs / "ca.key").stat().st_mode & 0o777 == 0o600
    assert "no certificates issued" in ok("ca", "list", cwd=ca)

    out = ok("ca", "issue", "redis", "--server", "--dns", "redis.local", "--ip", "::1", cwd=ca)
    assert out.strip() == "wrote certs/redis.crt and certs/redis.key"
    out = ok("ca", "issue", "--dir", "certs", "app", "--client", "--ou", "web", cwd=ca)
    assert out.strip() == "wrote certs/app.crt and certs/app.key"

    redis = x509.load_pem_x509_certificate((certs / "redis.crt").read_bytes())
    app = x509.load_pem_x509_certificate((certs / "app.crt").read_bytes())
    rows = list_rows(ca)
    assert sorted(rows) == ["app", "redis"]
    assert rows["redis"][0:2] == ["server", f"{redis.serial_number:x}"]
    assert rows["redis"][2] == f"{redis.not_valid_after_utc:%Y-%m-%d}"
    assert rows["app"][0:2] == ["client", f"{app.serial_number:x}"]
    assert rows["redis"][3] == rows["app"][3] == "valid"

    out = ok("ca", "revoke", "app", cwd=ca)
    assert f"revoked app (serial {app.serial_number:x})" in out
    rows = list_rows(ca)
    assert rows["app"][3] == "revoked"
    assert rows["redis"][3] == "valid"

    shown = ok("ca", "show", certs / "redis.crt", cwd=ca)
    assert redis.fingerprint(hashes.SHA256()).hex() in shown
    assert "DNS:redis.local" in shown
    assert "IP:::1" in shown
    assert "CA:         no" in shown

    shown = ok("ca", "show", "certs/crl.pem", cwd=ca)
    assert f"{app.serial_number:x}" in shown
    assert f"{redis.serial_number:x}" not in shown


def test_revoke_twice_exits_2(ca: Path) -> None:
    ok("ca", "issue", "app", "--client", cwd=ca)
    ok("ca", "revoke", "app", cwd=ca)
    result = tunnel("ca", "revoke", "app", cwd=ca)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "already revoked" in result.stderr


def test_existing_files_need_force(ca: Path) -> None:
    result = tunnel("ca", "init", cwd=ca)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: certs/ca.key already exists; use --force to replace it"

    ok("ca", "issue", "redis", "--server", cwd=ca)
    before = (ca / "certs" / "redis.key").read_bytes()
    result = tunnel("ca", "issue", "redis", "--server", cwd=ca)
    assert result.returncode == 2
    assert "error: certs/redis.key already exists; use --force" in result.stderr
    assert (ca / "certs" / "redis.key").read_bytes() == before

    ok("ca", "issue", "redis", "--server", "--force", cwd=ca)
    assert (ca / "certs" / "redis.key").read_bytes() != before


@pytest.mark.parametrize("flags", [[], ["--server", "--client"]])
def test_issue_needs_exactly_one_of_server_client(ca: Path, flags: list[str]) -> None:
    result = tunnel("ca", "issue", "redis", *flags, cwd=ca)
    assert result.returncode == 2
    assert "exactly one of --server or --client is required" in result.stderr
    assert not (ca / "certs" / "redis.key").exists()


def test_issue_without_a_ca_exits_2_naming_the_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = tunnel("ca", "issue", "--dir", "empty", "redis", "--server", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: CA not initialised")
    assert "empty/ca.key and empty/ca.crt missing" in result.stderr
    assert "Traceback" not in result.stderr

    result = tunnel("ca", "issue", "redis", "--server", cwd=tmp_path)  # default ./certs
    assert result.returncode == 2
    assert "certs/ca.key and certs/ca.crt missing" in result.stderr


def test_bad_ip_exits_2(ca: Path) -> None:
    result = tunnel("ca", "issue", "redis", "--server", "--ip", "300.1.1.1", cwd=ca)
    assert result.returncode == 2
    assert "error: invalid --ip value '300.1.1.1'" in result.stderr


def test_bad_key_type_is_a_usage_error(tmp_path: Path) -> None:
    result = tunnel("ca", "init", "--key-type", "dsa", cwd=tmp_path)
    assert result.returncode == 2
    assert "Invalid value for '--key-type'" in result.stderr
    assert not (tmp_path / "certs").exists()


def test_show_rejects_a_private_key(ca: Path) -> None:
    result = tunnel("ca", "show", "certs/ca.key", cwd=ca)
    assert result.returncode == 2
    assert "error: certs/ca.key is neither a PEM certificate nor a PEM CRL" in result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr


def test_crl_refresh_keeps_revocations_and_moves_next_update(ca: Path) -> None:
    ok("ca", "issue", "--dir", "certs", "gone", "--client", cwd=ca)
    ok("ca", "revoke", "--dir", "certs", "gone", cwd=ca)
    crl_path = ca / "certs" / "crl.pem"
    before = x509.load_pem_x509_crl(crl_path.read_bytes())
    out = ok("ca", "crl", "--dir", "certs", cwd=ca)
    assert "wrote certs/crl.pem" in out
    after = x509.load_pem_x509_crl(crl_path.read_bytes())
    assert {r.serial_number for r in after} == {r.serial_number for r in before}
    assert after.next_update_utc is not None
    assert before.next_update_utc is not None
    assert after.next_update_utc >= before.next_update_utc
    number = after.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1


def test_the_readme_intermediate_ca_walkthrough(tmp_path: Path) -> None:
    """README, "Intermediate CAs and the PKI you already have": the commands as written,
    then `tunnel check` of a server tunnel that uses what they wrote; then the intermediate
    revoked at the root, which `ca list` there shows."""
    steps = [
        ["ca", "init", "--dir", "root", "--name", "Example root CA"],
        ["ca", "init", "--dir", "issuing", "--parent", "root", "--name", "Example issuing CA"],
        ["ca", "issue", "--dir", "issuing", "redis", "--server", "--dns", "redis.internal"],
        ["ca", "issue", "--dir", "issuing", "app1", "--client"],
    ]
    for step in steps:
        result = tunnel(*step, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    shown = tunnel("ca", "show", "issuing/redis.crt", cwd=tmp_path)
    assert "Certificate 1 of 2 (leaf)" in shown.stdout
    assert "CN=Example issuing CA" in shown.stdout
    assert "Certificate 2 of 2" in shown.stdout
    (tmp_path / "redis.yaml").write_text(
        "mode: server\nlisten: 127.0.0.1:0\ntarget: 127.0.0.1:6379\n"
        "tls: {cert: issuing/redis.crt, key: issuing/redis.key, ca: issuing/root.crt,"
        " crl: [root/crl.pem, issuing/crl.pem]}\nallow: {cn: [app1]}\n"
    )
    checked = tunnel("check", "redis.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert tunnel("ca", "revoke", "--dir", "root", "issuing", cwd=tmp_path).returncode == 0
    listed = tunnel("ca", "list", "--dir", "root", cwd=tmp_path).stdout
    assert "issuing" in listed
    assert "revoked" in listed


def test_ca_init_makes_its_directories_0700_even_under_umask_000(tmp_path: Path) -> None:
    """Under umask 000 they used to be 0777: anyone could then swap ca.crt."""
    result = subprocess.run(
        ["sh", "-c", f"umask 000 && exec {sys.executable} -m tunnel.cli ca init --dir a/b/ca"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for directory in ("a", "a/b", "a/b/ca"):
        assert (tmp_path / directory).stat().st_mode & 0o777 == 0o700, directory
    assert (tmp_path / "a/b/ca/ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a/b/ca/ca.crt").stat().st_mode & 0o022 == 0


def test_ca_issue_lifetime_gives_a_short_lived_certificate(tmp_path: Path) -> None:
    ok("ca", "init", "--dir", "ca", cwd=tmp_path)
    ok("ca", "issue", "--dir", "ca", "brief", "--client", "--lifetime", "90s", cwd=tmp_path)
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "brief.crt").read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() == 99  # 90 s + 9 s back
    both = tunnel("ca", "issue", "--dir", "ca", "x", "--client", "--lifetime", "1h", "--days", "2", cwd=tmp_path)
    assert both.returncode == 2
    assert "give --days or --lifetime, not both" in both.stderr
    bad = tunnel("ca", "issue", "--dir", "ca", "y", "--client", "--lifetime", "soon", cwd=tmp_path)
    assert bad.returncode == 2
    assert "Invalid value for '--lifetime'" in bad.stderr
