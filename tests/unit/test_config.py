"""Unit tests for tunnel.config: YAML → frozen typed config, and the errors it gives."""

from __future__ import annotations

import copy
import math
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.config import (
    ALLOW_KEYS,
    LIMIT_KEYS,
    METRICS_KEYS,
    TLS_KEYS,
    TOP_KEYS,
    UNIX_KEYS,
    Address,
    ConfigError,
    Limits,
    MetricsConfig,
    TLSConfig,
    TunnelConfig,
    UnixSocket,
    find_files,
    listen_overlap,
    load_file,
    load_paths,
    parse_address,
    parse_document,
    parse_duration,
)
from tunnel.identity import AllowRule

FP = "ab" * 32  # a well-formed SHA-256 hex fingerprint
FP_COLONS = ":".join(["AB"] * 32)  # the same, as openssl prints it
PKI_FILES = ("cert.pem", "key.pem", "ca.pem", "crl.pem")


def make_pki_files(directory: Path) -> Path:
    """Dummy cert/key/ca/crl files: config.py only checks that they exist and are readable."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in PKI_FILES:
        (directory / name).write_text(f"dummy {name}\n")
    (directory / "key.pem").chmod(0o600)  # a key every user can read is refused
    return directory


def write_yaml(path: Path, document: object) -> Path:
    """Write `document` to `path`: a string verbatim, anything else through yaml.safe_dump."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def server_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "mode": "server",
        "listen": "127.0.0.1:8443",
        "target": "127.0.0.1:6379",
        "tls": {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"},
        "allow": {"cn": ["app1"]},
    }
    doc.update(changes)
    return doc


def client_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "mode": "client",
        "listen": "127.0.0.1:6380",
        "target": "db.example.org:8443",
        "tls": {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem"},
    }
    doc.update(changes)
    return doc


def tls_files(base: Path, **extra: Any) -> TLSConfig:
    return TLSConfig(cert=base / "cert.pem", key=base / "key.pem", ca=base / "ca.pem", **extra)


# --------------------------------------------------------------------------- valid files


# Each case: the YAML file's name, its text (TLS paths are relative to the YAML file's directory,
# where the dummy files live), and the expected TunnelConfig as a function of the YAML file's path.
VALID: list[tuple[str, str, str, Callable[[Path], TunnelConfig]]] = [
    (
        "server-minimal",
        "redis-in.yaml",
        """
        mode: server
        listen: 0.0.0.0:6380
        target: 127.0.0.1:6379
        tls: {cert: pki/cert.pem, key: pki/key.pem, ca: pki/ca.pem}
        allow: {cn: [app1, app2]}
        """,
        lambda p: TunnelConfig(
            name="redis-in",  # the file stem
            mode="server",
            listen=Address("0.0.0.0", 6380),
            targets=(Address("127.0.0.1", 6379),),
            tls=tls_files(p.parent / "pki"),
            source=p,
            allow=AllowRule(cn=frozenset({"app1", "app2"})),
            limits=Limits(),
        ),
    ),
    (
        "server-everything",
        "ignored-stem.yml",
        f"""
        name: pg.in
        mode: server
        listen: "[::]:5433"
        target: ["unix:/run/postgresql/.s.PGSQL.5432", "[::1]:5432", db:5432]
        tls:
          cert: pki/cert.pem
          key: pki/key.pem
          ca: pki/ca.pem
          crl: pki/crl.pem
          min_version: "1.3"
        allow:
          cn: app1
          dns: [app1.internal]
          uri: [spiffe://example.org/app1]
          ou: [ops, db]
          fingerprint: ["{FP_COLONS}"]
        limits:
          handshake_timeout: 500ms
          connect_timeout: 2.5
          idle_timeout: 5m
          max_connections: 10
          drain_timeout: 1h
        """,
        lambda p: TunnelConfig(
            name="pg.in",
            mode="server",
            listen=Address("::", 5433),
            targets=(
                Address(path="/run/postgresql/.s.PGSQL.5432"),
                Address("::1", 5432),
                Address("db", 5432),
            ),
            tls=tls_files(p.parent / "pki", crl=(p.parent / "pki" / "crl.pem",), min_version="1.3"),
            source=p,
            allow=AllowRule(
                cn=frozenset({"app1"}),
                dns=frozenset({"app1.internal"}),
                uri=frozenset({"spiffe://example.org/app1"}),
                ou=frozenset({"ops", "db"}),
                fingerprint=frozenset({FP}),
            ),
            limits=Limits(
                handshake_timeout=0.5,
                connect_timeout=2.5,
                idle_timeout=300.0,
                max_connections=10,
                drain_timeout=3600.0,
            ),
        ),
    ),
    (
        "server-any-idle-never",
        "open.yaml",
        """
        mode: server
        listen: unix:/tmp/tunnel.sock
        target: localhost:80
        tls: {cert: pki/cert.pem, key: pki/key.pem, ca: pki/ca.pem, crl: null, min_version: 1.3}
        allow: {any: true}
        limits: {idle_timeout: 0, handshake_timeout: 3}
        """,
        lambda p: TunnelConfig(
            name="open",
            mode="server",
            listen=Address(path="/tmp/tunnel.sock"),
            targets=(Address("localhost", 80),),
            tls=tls_files(p.parent / "pki", min_version="1.3"),  # unquoted 1.3 is a float in YAML
            source=p,
            allow=AllowRule(any=True),
            limits=Limits(handshake_timeout=3.0, idle_timeout=None),
        ),
    ),
    (
        "client-default-server-name",
        "redis-out.yaml",
        """
        mode: client
        listen: 127.0.0.1:6380
        target: [db1.example.org:8443, db2.example.org:8443]
        tls: {cert: pki/cert.pem, key: pki/key.pem, ca: pki/ca.pem}
        limits:
        """,
        lambda p: TunnelConfig(
            name="redis-out",
            mode="client",
            listen=Address("127.0.0.1", 6380),
            targets=(Address("db1.example.org", 8443), Address("db2.example.org", 8443)),
            tls=tls_files(p.parent / "pki", server_name=None),  # each target is checked against its own host
            source=p,
            allow=None,
            limits=Limits(),
        ),
    ),
    (
        "client-ipv6-target",
        "v6.yaml",
        """
        mode: client
        listen: localhost:1
        target: "[2001:db8::7]:443"
        tls: {cert: pki/cert.pem, key: pki/key.pem, ca: pki/ca.pem}
        """,
        lambda p: TunnelConfig(
            name="v6",
            mode="client",
            listen=Address("localhost", 1),
            targets=(Address("2001:db8::7", 443),),
            tls=tls_files(p.parent / "pki", server_name=None),
            source=p,
        ),
    ),
    (
        "client-unix-target-explicit-server-name",
        "sock.yaml",
        """
        name: sock
        mode: client
        listen: 127.0.0.1:7000
        target: unix:/run/app.sock
        tls: {cert: pki/cert.pem, key: pki/key.pem, ca: pki/ca.pem, server_name: " app.internal "}
        limits: {idle_timeout: 0s, max_connections: 1}
        """,
        lambda p: TunnelConfig(
            name="sock",
            mode="client",
            listen=Address("127.0.0.1", 7000),
            targets=(Address(path="/run/app.sock"),),
            tls=tls_files(p.parent / "pki", server_name="app.internal"),
            source=p,
            limits=Limits(idle_timeout=None, max_connections=1),
        ),
    ),
    (
        "client-unix-listen-permissions-and-peers",
        "app.yaml",
        """
        mode: client
        listen: unix:app.sock
        target: db:8443
        tls: {cert: pki/cert.pem, key: pki/key.pem, ca: pki/ca.pem}
        unix:
          mode: "0660"
          group: root
          allow_users: [root, 65534, "1000"]
          allow_groups: 0
        """,
        lambda p: TunnelConfig(
            name="app",
            mode="client",
            listen=Address(path=str(p.parent / "app.sock")),
            targets=(Address("db", 8443),),
            tls=tls_files(p.parent / "pki"),
            source=p,
            unix=UnixSocket(
                mode=0o660,
                group=0,
                allow_users=frozenset({0, 65534, 1000}),
                allow_groups=frozenset({0}),
            ),
        ),
    ),
    (
        "server-unix-listen-defaults",
        "s.yaml",
        """
        mode: server
        listen: unix:/run/tunnel/s.sock
        target: db:5432
        tls: {cert: pki/cert.pem, key: pki/key.pem, ca: pki/ca.pem}
        allow: {any: true}
        unix: {mode: "600", allow_groups: ["0"]}
        """,
        lambda p: TunnelConfig(
            name="s",
            mode="server",
            listen=Address(path="/run/tunnel/s.sock"),
            targets=(Address("db", 5432),),
            tls=tls_files(p.parent / "pki"),
            source=p,
            allow=AllowRule(any=True),
            unix=UnixSocket(mode=0o600, allow_groups=frozenset({0})),
        ),
    ),
]


@pytest.mark.parametrize(
    ("filename", "text", "expected"),
    [pytest.param(filename, text, expected, id=case_id) for case_id, filename, text, expected in VALID],
)
def test_valid_files_load_into_expected_config(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    filename: str,
    text: str,
    expected: Callable[[Path], TunnelConfig],
) -> None:
    conf_dir = tmp_path / "conf"
    make_pki_files(conf_dir / "pki")
    path = write_yaml(conf_dir / filename, textwrap.dedent(text))
    # Relative paths must resolve against the YAML file's directory, not the working directory.
    elsewhere = tmp_path / "elsewhere"
    make_pki_files(elsewhere / "pki")
    monkeypatch.chdir(elsewhere)

    config = load_file(path)

    assert config == expected(path)
    assert config.tls.cert.is_relative_to(conf_dir)


def test_home_relative_paths_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_pki_files(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    doc = server_doc(tls={"cert": "~/cert.pem", "key": "~/key.pem", "ca": "~/ca.pem"})
    config = load_file(write_yaml(tmp_path / "conf" / "t.yaml", doc))
    assert config.tls == tls_files(home)


def test_key_password_file_is_relative_to_the_yaml_file_and_watched(tmp_path: Path) -> None:
    conf_dir = make_pki_files(tmp_path / "conf")
    (conf_dir / "secrets").mkdir()
    (conf_dir / "secrets" / "key.pass").write_text("s3cret\n")
    (conf_dir / "secrets" / "key.pass").chmod(0o600)
    tls = {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem", "key_password_file": "secrets/key.pass"}
    config = load_file(write_yaml(conf_dir / "t.yaml", server_doc(tls=tls)))
    assert config.tls == tls_files(conf_dir, key_password_file=conf_dir / "secrets" / "key.pass")
    assert conf_dir / "secrets" / "key.pass" in config.files()


def test_key_password_file_must_exist(tmp_path: Path) -> None:
    conf_dir = make_pki_files(tmp_path / "conf")
    tls = {"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem", "key_password_file": "nope.pass"}
    with pytest.raises(ConfigError, match=r"tls\.key_password_file: file not found: .*nope\.pass"):
        load_file(write_yaml(conf_dir / "t.yaml", server_doc(tls=tls)))


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    config = load_file(write_yaml(tmp_path / "t.yaml", server_doc()))
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.limits.max_connections = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("0.25s", 0.25),
        (" 10 s ", 10.0),
        ("7", 7.0),
        ("0", 0.0),
        ("0ms", 0.0),
        (3, 3.0),
        (0, 0.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "expected a duration"),
        (False, "expected a duration"),
        (None, "expected a duration"),
        ([], "expected a duration"),
        ({"s": 1}, "expected a duration"),
        ("", "expected a duration"),
        ("s", "expected a duration"),
        ("10d", "expected a duration"),
        ("10 sec", "expected a duration"),
        ("1.s", "expected a duration"),
        ("ten", "expected a duration"),
        ("-1s", "expected a duration"),
        ("1m30s", "expected a duration"),
        ("\u0661\u0660s", "expected a duration"),  # Arabic-Indic digits are not ASCII digits
        (-1, "negative"),
        (-0.5, "negative"),
        (float("nan"), "NaN"),
        (float("inf"), "too long"),
        (10**400, "too long"),  # too large for a float
        ("1" * 400 + "s", "too long"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "address", "canonical"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80), "127.0.0.1:80"),
        ("localhost:0", Address("localhost", 0), "localhost:0"),
        ("db.example.org:65535", Address("db.example.org", 65535), "db.example.org:65535"),
        ("  host:1  ", Address("host", 1), "host:1"),
        ("[::1]:443", Address("::1", 443), "[::1]:443"),
        ("[::]:8443", Address("::", 8443), "[::]:8443"),
        ("[2001:db8::1]:5432", Address("2001:db8::1", 5432), "[2001:db8::1]:5432"),
        ("[fe80::1%eth0]:22", Address("fe80::1%eth0", 22), "[fe80::1%eth0]:22"),
        ("unix:/run/app.sock", Address(path="/run/app.sock"), "unix:/run/app.sock"),
        ("unix:relative.sock", Address(path="relative.sock"), "unix:relative.sock"),
    ],
)
def test_parse_address_accepts(text: str, address: Address, canonical: str) -> None:
    parsed = parse_address(text)
    assert parsed == address
    assert parsed.is_unix == (address.path is not None)
    assert str(parsed) == canonical
    assert parse_address(str(parsed)) == parsed  # str() round-trips


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "expected HOST:PORT"),
        ("   ", "expected HOST:PORT"),
        (6380, "expected HOST:PORT"),
        (True, "expected HOST:PORT"),
        (None, "expected HOST:PORT"),
        (["a:1"], "expected HOST:PORT"),
        ("host", "expected HOST:PORT"),
        (":80", "expected HOST:PORT"),
        ("host:", "port must be a number"),
        ("host:65536", "port must be a number from 0 to 65535"),
        ("host:99999999999999999999", "port must be a number"),
        ("host:-1", "port must be a number"),
        ("host:+80", "port must be a number"),
        ("host:http", "port must be a number"),
        ("host:\u00b2", "port must be a number"),  # superscript two: isdigit() but not int()
        ("host:\u0668\u0660", "port must be a number"),  # Arabic-Indic 80
        ("::1:80", "brackets"),
        ("[::1]", "expected \\[IPV6\\]:PORT"),
        ("[::1]80", "expected \\[IPV6\\]:PORT"),
        ("[::1]:", "port must be a number"),
        ("[::1]:70000", "port must be a number"),
        ("[]:80", "not an IPv6 address"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        ("[db.example.org]:80", "not an IPv6 address"),
        ("unix:", "socket path"),
    ],
)
def test_parse_address_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(value)


# --------------------------------------------------------------------------- errors


def test_config_error_names_file_and_key() -> None:
    err = ConfigError(Path("/etc/tunnel/a.yaml"), "tls.cert", "required")
    assert (err.file, err.key, err.message) == ("/etc/tunnel/a.yaml", "tls.cert", "required")
    assert str(err) == "/etc/tunnel/a.yaml: tls.cert: required"
    assert str(ConfigError("a.yaml", "", "the file is empty")) == "a.yaml: the file is empty"


def _without(doc: dict[str, Any], *path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return doc


def _with(doc: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    node[last] = value
    return doc


S = server_doc()
C = client_doc()
U = client_doc(listen="unix:/run/tunnel/app.sock")  # a client tunnel on a unix socket


def unix_text(fragment: str) -> str:
    """Raw YAML for the unix-listen client document U, with `fragment` appended."""
    return yaml.safe_dump(U) + fragment


def server_text(fragment: str) -> str:
    """Raw YAML for a valid server document whose top-level sections in `fragment` are replaced."""
    replaced = yaml.safe_load(fragment)
    assert isinstance(replaced, dict)
    return yaml.safe_dump({k: v for k, v in S.items() if k not in replaced}) + fragment


NON_STRING_KEY: dict[object, Any] = {key: value for key, value in S.items()}
NON_STRING_KEY[1] = "x"
TLS_TEXT = "cert: cert.pem, key: key.pem, ca: ca.pem"

# (id, document (dict → safe_dump, str → verbatim), expected key, expected text in the message)
BAD: list[tuple[str, object, str, str]] = [
    # structure
    ("empty-file", "", "", "the file is empty"),
    ("only-a-comment", "# nothing here\n", "", "the file is empty"),
    ("invalid-yaml", "mode: server\nlisten: [127.0.0.1:1\n", "", "line 3"),
    ("invalid-yaml-tab", "mode: server\n\tlisten: x\n", "", "not valid YAML"),
    ("yaml-bad-date", "mode: 2001-02-30\n", "", "not valid YAML"),  # PyYAML raises ValueError
    ("yaml-bad-int-tag", "mode: !!int x\n", "", "not valid YAML"),
    ("yaml-bad-bool-tag", "mode: !!bool x\n", "", "not valid YAML"),  # PyYAML raises KeyError
    ("yaml-bad-timestamp-tag", "mode: !!timestamp x\n", "", "not valid YAML"),  # AttributeError
    ("yaml-nested-too-deeply", "[" * 5000, "", "not valid YAML: nested too deeply"),  # RecursionError
    ("document-is-a-list", "- mode: server\n- mode: client\n", "", "expected a mapping, got a list"),
    ("document-is-a-string", "just some text\n", "", "expected a mapping, got a string"),
    ("document-is-a-number", "42\n", "", "expected a mapping, got an integer"),
    ("non-string-key", NON_STRING_KEY, "(top level)", "keys must be strings"),
    ("unknown-top-level-key", {**S, "bogus": 1}, "bogus", "unknown key"),
    ("unknown-tls-key", _with(S, "tls.foo", 1), "tls.foo", "unknown key"),
    ("unknown-limits-key", {**S, "limits": {"bar": 1}}, "limits.bar", "unknown key"),
    ("unknown-allow-key", _with(S, "allow.baz", ["x"]), "allow.baz", "unknown key"),
    ("status-unix", {**S, "status": "unix:/run/x.sock"}, "status", "expected HOST:PORT"),
    ("status-garbage", {**S, "status": 9000}, "status", "expected HOST:PORT"),
    ("proxy-protocol-v1", {**S, "proxy_protocol": "v1"}, "proxy_protocol", "expected v2"),
    ("proxy-protocol-bool", {**S, "proxy_protocol": True}, "proxy_protocol", "expected v2"),
    ("proxy-protocol-client", {**C, "proxy_protocol": "v2"}, "proxy_protocol", "only for server mode"),
    # name
    ("name-with-space", {**S, "name": "redis in"}, "name", "use letters, digits"),
    ("name-starts-with-dot", {**S, "name": ".hidden"}, "name", "use letters, digits"),
    ("name-empty", {**S, "name": ""}, "name", "expected a non-empty string"),
    ("name-number", {**S, "name": 5}, "name", "expected a non-empty string, got an integer"),
    # mode
    ("missing-mode", _without(S, "mode"), "mode", "required"),
    ("bad-mode", {**S, "mode": "proxy"}, "mode", "expected server or client, not 'proxy'"),
    ("huge-int-mode", "mode: 0x" + "f" * 5000 + "\n", "mode", "too large to show"),
    # listen / target
    ("missing-listen", _without(S, "listen"), "listen", "required"),
    ("listen-int", {**S, "listen": 6380}, "listen", "expected HOST:PORT, [IPV6]:PORT or unix:/path, not 6380"),
    ("listen-port-too-big", {**S, "listen": "127.0.0.1:65536"}, "listen", "from 0 to 65535"),
    ("listen-v6-no-brackets", {**S, "listen": "::1:80"}, "listen", "brackets"),
    ("missing-target", _without(S, "target"), "target", "required"),
    ("target-empty-list", {**S, "target": []}, "target", "the list is empty"),
    ("target-mapping", {**S, "target": {"host": "a"}}, "target", "expected HOST:PORT"),
    ("target-port-0", {**S, "target": "db:0"}, "target", "port 0 is not a target"),
    ("target-list-bad-item", {**S, "target": ["a:1", "b"]}, "target[1]", "expected HOST:PORT"),
    ("target-list-port-0", {**S, "target": ["a:1", "b:0"]}, "target[1]", "port 0 is not a target"),
    # tls
    ("missing-tls", _without(S, "tls"), "tls", "required"),
    ("tls-string", {**S, "tls": "cert.pem"}, "tls", "expected a mapping, got a string"),
    ("missing-tls-cert", _without(S, "tls", "cert"), "tls.cert", "required"),
    ("missing-tls-key", _without(S, "tls", "key"), "tls.key", "required"),
    ("missing-tls-ca", _without(S, "tls", "ca"), "tls.ca", "required"),
    ("tls-cert-list", _with(S, "tls.cert", ["cert.pem"]), "tls.cert", "expected a non-empty string"),
    ("tls-cert-not-found", _with(S, "tls.cert", "nope.pem"), "tls.cert", "file not found"),
    ("tls-key-not-found", _with(S, "tls.key", "nope.pem"), "tls.key", "file not found"),
    ("tls-ca-not-found", _with(S, "tls.ca", "nope.pem"), "tls.ca", "file not found"),
    ("tls-crl-not-found", _with(S, "tls.crl", "nope.pem"), "tls.crl", "file not found"),
    ("tls-crl-list-item-not-found", _with(S, "tls.crl", ["crl.pem", "nope.pem"]), "tls.crl[1]", "file not found"),
    ("tls-crl-empty-list", _with(S, "tls.crl", []), "tls.crl", "the list is empty"),
    ("tls-cert-is-a-directory", _with(S, "tls.cert", "."), "tls.cert", "not a regular file"),
    ("tls-cert-name-too-long", _with(S, "tls.cert", "x" * 300), "tls.cert", "cannot use"),
    ("min-version-1.1", _with(S, "tls.min_version", "1.1"), "tls.min_version", '"1.2" or "1.3"'),
    ("min-version-int", _with(S, "tls.min_version", 13), "tls.min_version", '"1.2" or "1.3", not 13'),
    (
        "min-version-huge-int",
        server_text(f"tls: {{{TLS_TEXT}, min_version: 0x{'f' * 5000}}}\n"),
        "tls.min_version",
        "too large",
    ),
    ("server-name-in-server-mode", _with(S, "tls.server_name", "x"), "tls.server_name", "only for client"),
    (
        "client-unix-target-needs-server-name",
        {**C, "target": "unix:/run/app.sock"},
        "tls.server_name",
        "required when a target is a unix socket",
    ),
    ("client-server-name-empty", _with(C, "tls.server_name", " "), "tls.server_name", "non-empty string"),
    # allow
    ("server-without-allow", _without(S, "allow"), "allow", "required in server mode"),
    ("allow-empty", {**S, "allow": {}}, "allow", "admits nobody"),
    ("allow-empty-lists", {**S, "allow": {"cn": [], "dns": None}}, "allow", "admits nobody"),
    ("allow-any-false", {**S, "allow": {"any": False}}, "allow", "admits nobody"),
    ("allow-null", {**S, "allow": None}, "allow", "expected a mapping, got nothing"),
    ("allow-any-string", {**S, "allow": {"any": "yes"}}, "allow.any", "expected true or false"),
    ("allow-cn-int", {**S, "allow": {"cn": 5}}, "allow.cn", "expected a list of strings, got an integer"),
    ("allow-ou-mapping", {**S, "allow": {"ou": {"a": 1}}}, "allow.ou", "expected a list of strings"),
    ("allow-dns-item-int", {**S, "allow": {"dns": ["a", 5]}}, "allow.dns[1]", "non-empty string"),
    ("allow-in-client-mode", {**C, "allow": {"any": True}}, "allow", "only for server mode"),
    ("bad-fingerprint", {**S, "allow": {"fingerprint": ["zz"]}}, "allow.fingerprint[0]", "not a SHA-256"),
    ("short-fingerprint", {**S, "allow": {"fingerprint": FP[:-2]}}, "allow.fingerprint", "not a SHA-256"),
    # The index must be the bad item's place in the YAML list, whatever order the set sorts into.
    ("bad-fingerprint-first", {**S, "allow": {"fingerprint": ["zz", FP]}}, "allow.fingerprint[0]", "'zz'"),
    ("bad-fingerprint-third", {**S, "allow": {"fingerprint": [FP, FP, "zz"]}}, "allow.fingerprint[2]", "'zz'"),
    # limits
    ("limits-list", {**S, "limits": [1]}, "limits", "expected a mapping, got a list"),
    (
        "handshake-timeout-zero",
        {**S, "limits": {"handshake_timeout": "0s"}},
        "limits.handshake_timeout",
        "more than zero",
    ),
    ("connect-timeout-zero", {**S, "limits": {"connect_timeout": 0}}, "limits.connect_timeout", "more than zero"),
    ("drain-timeout-bad", {**S, "limits": {"drain_timeout": "soon"}}, "limits.drain_timeout", "expected a duration"),
    ("idle-timeout-negative", {**S, "limits": {"idle_timeout": -1}}, "limits.idle_timeout", "negative"),
    ("idle-timeout-bool", {**S, "limits": {"idle_timeout": True}}, "limits.idle_timeout", "expected a duration"),
    ("idle-timeout-nan", server_text("limits: {idle_timeout: .nan}\n"), "limits.idle_timeout", "NaN"),
    ("idle-timeout-inf", server_text("limits: {idle_timeout: .inf}\n"), "limits.idle_timeout", "too long"),
    (
        "handshake-timeout-huge",
        server_text(f"limits: {{handshake_timeout: 1{'0' * 400}}}\n"),
        "limits.handshake_timeout",
        "too long",
    ),
    ("max-connections-zero", {**S, "limits": {"max_connections": 0}}, "limits.max_connections", "at least 1"),
    ("close-on-expiry-string", {**S, "limits": {"close_on_expiry": "yes"}}, "limits.close_on_expiry", "true or false"),
    ("max-connections-string", {**S, "limits": {"max_connections": "10"}}, "limits.max_connections", "whole number"),
    ("max-connections-bool", {**S, "limits": {"max_connections": True}}, "limits.max_connections", "whole number"),
    ("max-connections-float", {**S, "limits": {"max_connections": 10.0}}, "limits.max_connections", "whole number"),
    ("max-handshakes-zero", {**S, "limits": {"max_handshakes": 0}}, "limits.max_handshakes", "at least 1"),
    ("max-handshakes-null", {**S, "limits": {"max_handshakes": None}}, "limits.max_handshakes", "got nothing"),
    (
        "max-handshakes-over-max-connections",
        {**S, "limits": {"max_connections": 10, "max_handshakes": 11}},
        "limits.max_handshakes",
        "11 is more than limits.max_connections (10)",
    ),
    ("per-source-list", {**S, "limits": {"per_source": [1]}}, "limits.per_source", "expected a mapping"),
    ("per-source-unknown", {**S, "limits": {"per_source": {"tls": 1}}}, "limits.per_source.tls", "unknown key"),
    (
        "per-source-handshakes-string",
        {**S, "limits": {"per_source": {"handshakes": "10"}}},
        "limits.per_source.handshakes",
        "whole number",
    ),
    (
        "per-source-connections-negative",
        {**S, "limits": {"per_source": {"connections": -1}}},
        "limits.per_source.connections",
        "at least 1",
    ),
    (
        "per-source-handshakes-over-max-handshakes",
        {**S, "limits": {"max_handshakes": 20, "per_source": {"handshakes": 21}}},
        "limits.per_source.handshakes",
        "21 is more than limits.max_handshakes (20)",
    ),
    (
        "per-source-handshakes-over-its-connections",
        {**S, "limits": {"per_source": {"handshakes": 20, "connections": 10}}},
        "limits.per_source.handshakes",
        "20 is more than limits.per_source.connections (10)",
    ),
    (
        "per-source-connections-over-max-connections",
        {**S, "limits": {"max_connections": 100, "per_source": {"connections": 101}}},
        "limits.per_source.connections",
        "more than limits.max_connections (100)",
    ),
    (
        "per-identity-over-max-connections",
        {**S, "limits": {"max_connections": 100, "per_identity_connections": 200}},
        "limits.per_identity_connections",
        "more than limits.max_connections (100)",
    ),
    (
        "per-identity-bool",
        {**S, "limits": {"per_identity_connections": True}},
        "limits.per_identity_connections",
        "whole",
    ),
    # unix
    ("unix-on-a-tcp-listen", {**S, "unix": {"mode": "0660"}}, "unix", "only for a unix: listen address"),
    ("unix-empty-on-a-tcp-listen", {**C, "unix": {}}, "unix", "only for a unix: listen address"),
    ("unix-not-a-mapping", {**U, "unix": "0660"}, "unix", "expected a mapping, got a string"),
    ("unix-unknown-key", {**U, "unix": {"owner": "app"}}, "unix.owner", "unknown key"),
    ("unix-mode-not-octal", {**U, "unix": {"mode": "0999"}}, "unix.mode", 'expected an octal mode from "0000"'),
    ("unix-mode-letters", {**U, "unix": {"mode": "abc"}}, "unix.mode", "not 'abc'"),
    ("unix-mode-setuid", {**U, "unix": {"mode": "4755"}}, "unix.mode", "expected an octal mode"),
    ("unix-mode-too-long", {**U, "unix": {"mode": "00660"}}, "unix.mode", "expected an octal mode"),
    ("unix-mode-symbolic", {**U, "unix": {"mode": "u+rw"}}, "unix.mode", "expected an octal mode"),
    ("unix-mode-unquoted", unix_text("unix: {mode: 660}\n"), "unix.mode", 'quoted string, e.g. "0660", not 660'),
    ("unix-mode-yaml-octal", unix_text("unix: {mode: 0660}\n"), "unix.mode", 'quoted string, e.g. "0660", not 432'),
    ("unix-mode-bool", {**U, "unix": {"mode": True}}, "unix.mode", "expected an octal mode"),
    ("unix-mode-list", {**U, "unix": {"mode": ["0660"]}}, "unix.mode", "expected an octal mode"),
    ("unix-group-unknown", {**U, "unix": {"group": "no-such-group-x"}}, "unix.group", "no such group"),
    ("unix-group-list", {**U, "unix": {"group": ["app"]}}, "unix.group", "a group name or a numeric id, got a list"),
    ("unix-group-negative", {**U, "unix": {"group": -1}}, "unix.group", "-1 is not a valid group id"),
    ("unix-group-too-big", {**U, "unix": {"group": 2**32 - 1}}, "unix.group", "not a valid group id"),
    ("unix-group-nul", {**U, "unix": {"group": "a\x00b"}}, "unix.group", "cannot look up group"),
    ("unix-allow-users-empty", {**U, "unix": {"allow_users": []}}, "unix.allow_users", "the list is empty"),
    (
        "unix-allow-users-unknown",
        {**U, "unix": {"allow_users": ["root", "no-such-user-x"]}},
        "unix.allow_users[1]",
        "no such user: 'no-such-user-x'",
    ),
    ("unix-allow-users-one-unknown", {**U, "unix": {"allow_users": "nope-x"}}, "unix.allow_users", "no such user"),
    ("unix-allow-users-mapping", {**U, "unix": {"allow_users": {"a": 1}}}, "unix.allow_users", "got a mapping"),
    ("unix-allow-users-float", {**U, "unix": {"allow_users": [1.5]}}, "unix.allow_users[0]", "got a float"),
    ("unix-allow-users-huge", {**U, "unix": {"allow_users": ["9" * 40]}}, "unix.allow_users[0]", "not a valid user"),
    ("unix-allow-groups-unknown", {**U, "unix": {"allow_groups": ["nope-x"]}}, "unix.allow_groups[0]", "no such"),
    ("unix-allow-groups-bool", {**U, "unix": {"allow_groups": [True]}}, "unix.allow_groups[0]", "got a boolean"),
    # metrics
    ("metrics-list", {**S, "metrics": [True]}, "metrics", "expected a mapping, got a list"),
    ("metrics-unknown-key", {**S, "metrics": {"per_tunnel": True}}, "metrics.per_tunnel", "unknown key"),
    ("metrics-per-identity-string", {**S, "metrics": {"per_identity": "yes"}}, "metrics.per_identity", "true or false"),
    ("metrics-max-identities-zero", {**S, "metrics": {"max_identities": 0}}, "metrics.max_identities", "at least 1"),
    ("metrics-max-identities-negative", {**C, "metrics": {"max_identities": -5}}, "metrics.max_identities", "least 1"),
    ("metrics-max-identities-float", {**S, "metrics": {"max_identities": 2.5}}, "metrics.max_identities", "whole"),
    ("metrics-max-identities-bool", {**S, "metrics": {"max_identities": True}}, "metrics.max_identities", "whole"),
    ("metrics-max-identities-text", {**S, "metrics": {"max_identities": "100"}}, "metrics.max_identities", "whole"),
]


@pytest.mark.parametrize(
    ("document", "key", "message"),
    [pytest.param(document, key, message, id=case_id) for case_id, document, key, message in BAD],
)
def test_bad_documents_raise_config_error(tmp_path: Path, document: object, key: str, message: str) -> None:
    make_pki_files(tmp_path)
    path = write_yaml(tmp_path / "tunnel.yaml", document)

    with pytest.raises(ConfigError) as caught:
        load_file(path)

    err = caught.value
    assert err.file == str(path)
    assert err.key == key
    assert message in err.message
    assert str(err) == (f"{path}: {key}: {err.message}" if key else f"{path}: {err.message}")
    assert len(str(err)) < 1000  # huge values are abbreviated, not pasted into the message


def test_metrics_defaults_to_no_identity_series_and_reads_both_keys(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    default = MetricsConfig(per_identity=False, max_identities=100)
    assert load_file(write_yaml(tmp_path / "a.yaml", S)).metrics == default
    assert load_file(write_yaml(tmp_path / "b.yaml", {**S, "metrics": None})).metrics == MetricsConfig()
    loaded = load_file(write_yaml(tmp_path / "c.yaml", {**C, "metrics": {"per_identity": True, "max_identities": 5}}))
    assert loaded.metrics == MetricsConfig(per_identity=True, max_identities=5)
    assert load_file(write_yaml(tmp_path / "d.yaml", {**S, "metrics": {"per_identity": True}})).metrics == (
        MetricsConfig(per_identity=True, max_identities=100)
    )


def test_error_table_bases_are_valid(tmp_path: Path) -> None:
    """The error table's base documents load, so each row tests only its own change."""
    make_pki_files(tmp_path)
    assert load_file(write_yaml(tmp_path / "s.yaml", S)).mode == "server"
    assert load_file(write_yaml(tmp_path / "c.yaml", C)).mode == "client"
    text = server_text(f"tls: {{{TLS_TEXT}, min_version: 1.3}}\nlimits: {{idle_timeout: .5}}\n")
    config = load_file(write_yaml(tmp_path / "f.yaml", text))
    assert (config.tls.min_version, config.limits.idle_timeout) == ("1.3", 0.5)
    assert load_file(write_yaml(tmp_path / "u.yaml", unix_text("unix: {mode: '0660'}\n"))).unix.mode == 0o660


def _shared_tree(width: int, depth: int) -> list[Any]:
    """A list of width**depth leaves built from shared references, as YAML aliases make them."""
    node: list[Any] = ["leaf"] * width
    for _ in range(depth - 1):
        node = [node] * width
    return node


def _deep_list(depth: int) -> list[Any]:
    node: list[Any] = []
    for _ in range(depth):
        node = [node]
    return node


@pytest.mark.parametrize(
    ("mode", "shown"),
    [
        ("x" * 5000, "'xxxxx"),
        (_shared_tree(10, 6), "[[[[...], [...]"),
        (_deep_list(100_000), "[[[[...]]]]"),
        (16**5000, "(an integer too large to show)"),
    ],
    ids=["long-string", "million-leaves", "deep", "huge-int"],
)
def test_error_messages_abbreviate_values(tmp_path: Path, mode: object, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_document({"mode": mode}, tmp_path / "t.yaml")
    assert caught.value.key == "mode"
    assert caught.value.message.startswith(f"expected server or client, not {shown}")
    assert len(caught.value.message) < 300


def test_unknown_key_message_lists_the_allowed_keys(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_file(write_yaml(tmp_path / "t.yaml", _with(S, "tls.foo", 1)))
    assert "ca, cert, crl, key, key_password_file, min_version, renew, server_name" in caught.value.message


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "file not found"),
        (lambda p: p.mkdir(), "cannot read"),
        (lambda p: p.write_bytes(b"mode: \xff\xfe\n"), "cannot read"),
    ],
    ids=["missing", "directory", "not-utf8"],
)
def test_load_file_unreadable(tmp_path: Path, setup: Callable[[Path], object], message: str) -> None:
    path = tmp_path / "t.yaml"
    setup(path)
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert (caught.value.key, caught.value.file) == ("", str(path))
    assert message in caught.value.message


# --------------------------------------------------------------------------- several files


def test_load_paths_directory_of_two_files(tmp_path: Path) -> None:
    make_pki_files(tmp_path / "pki")
    tls = {"cert": "../pki/cert.pem", "key": "../pki/key.pem", "ca": "../pki/ca.pem"}
    conf = tmp_path / "conf"
    write_yaml(conf / "b.yml", client_doc(tls=tls))
    write_yaml(conf / "a.yaml", server_doc(tls=tls))
    write_yaml(conf / "README.txt", "not a tunnel")
    (conf / "sub.yaml").mkdir()  # a directory named like a file is skipped

    configs = load_paths([conf])

    assert [(c.name, c.mode, c.source) for c in configs] == [
        ("a", "server", conf / "a.yaml"),
        ("b", "client", conf / "b.yml"),
    ]
    assert configs[0].tls.cert == conf / "../pki/cert.pem"
    assert find_files([conf]) == [conf / "a.yaml", conf / "b.yml"]


def test_load_paths_files_and_directories_mixed(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    one = write_yaml(tmp_path / "one.yaml", server_doc())
    write_yaml(tmp_path / "dir" / "two.yaml", client_doc(tls={k: f"../{k}.pem" for k in ("cert", "key", "ca")}))
    assert [c.name for c in load_paths([one, tmp_path / "dir"])] == ["one", "two"]


def test_load_paths_duplicate_names(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    write_yaml(tmp_path / "a.yaml", server_doc(name="redis"))
    second = write_yaml(tmp_path / "b.yaml", client_doc(name="redis"))
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path])
    err = caught.value
    assert (err.file, err.key) == (str(second), "name")
    assert "'redis'" in err.message
    assert str(tmp_path / "a.yaml") in err.message


@pytest.mark.parametrize("listen", ["127.0.0.1:7000", "[::1]:7000", "unix:/run/t.sock"])
def test_load_paths_duplicate_listen(tmp_path: Path, listen: str) -> None:
    make_pki_files(tmp_path)
    write_yaml(tmp_path / "a.yaml", server_doc(listen=listen))
    second = write_yaml(tmp_path / "b.yaml", client_doc(listen=listen))
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path])
    err = caught.value
    assert (err.file, err.key) == (str(second), "listen")
    assert listen in err.message
    assert str(tmp_path / "a.yaml") in err.message


def test_load_paths_port_zero_may_repeat(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    write_yaml(tmp_path / "a.yaml", server_doc(listen="127.0.0.1:0"))
    write_yaml(tmp_path / "b.yaml", client_doc(listen="127.0.0.1:0"))
    assert [c.listen for c in load_paths([tmp_path])] == [Address("127.0.0.1", 0)] * 2


def test_load_paths_reports_the_bad_file(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    write_yaml(tmp_path / "a.yaml", server_doc())
    bad = write_yaml(tmp_path / "b.yaml", server_doc(mode="both"))
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path])
    assert (caught.value.file, caught.value.key) == (str(bad), "mode")


def test_find_files_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no tunnels here")
    with pytest.raises(ConfigError) as caught:
        find_files([tmp_path])
    assert (caught.value.file, caught.value.key) == (str(tmp_path), "")
    assert "no *.yaml files" in caught.value.message


def test_find_files_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        find_files([tmp_path / "nope.yaml"])
    assert (caught.value.file, caught.value.key, caught.value.message) == (
        str(tmp_path / "nope.yaml"),
        "",
        "file not found",
    )


def test_find_files_takes_a_named_file_whatever_its_suffix(tmp_path: Path) -> None:
    named = tmp_path / "tunnel.conf"
    named.write_text("")
    assert find_files([named]) == [named]


# --------------------------------------------------------------------------- properties

KNOWN_KEYS = sorted(TOP_KEYS | TLS_KEYS | ALLOW_KEYS | LIMIT_KEYS | UNIX_KEYS | METRICS_KEYS)

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**1100), max_value=2**1100),  # past a float's range
    st.floats(),  # NaN and infinities included
    st.text(max_size=20),
    st.sampled_from(
        [
            *("server", "client", "127.0.0.1:1", "[::1]:2", "unix:/x", "h:0", "1.2", "1.3", "0", "5s"),
            *(FP, FP_COLONS, "cert.pem", "ca.pem", ".", "", "x" * 300, "a\x00b"),
        ]
    ),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**400, -1, 0, 1.3, "0s", "-0"]),
)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10), st.integers(), st.none(), st.booleans())
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(KEYS, children, max_size=5),
    ),
    max_leaves=20,
)

FULL_SERVER = server_doc(
    name="full",
    target=["a:1", "unix:/b"],
    tls={"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem", "crl": "crl.pem", "min_version": "1.3"},
    allow={"cn": ["a"], "dns": "d", "uri": ["u"], "ou": ["o"], "fingerprint": [FP_COLONS], "any": False},
    limits={
        "handshake_timeout": "1s",
        "connect_timeout": 2,
        "idle_timeout": 0,
        "max_connections": 3,
        "drain_timeout": "4m",
        "max_handshakes": 2,
        "per_source": {"handshakes": 1, "connections": 2},
        "per_identity_connections": 2,
    },
    metrics={"per_identity": True, "max_identities": 7},
)
FULL_CLIENT = client_doc(tls={"cert": "cert.pem", "key": "key.pem", "ca": "ca.pem", "server_name": "db"})
FULL_UNIX = client_doc(
    listen="unix:/run/tunnel/app.sock",
    unix={"mode": "0660", "group": "root", "allow_users": ["root", 65534], "allow_groups": [0]},
)


def _nodes(node: object) -> Iterator[tuple[dict[Any, Any] | list[Any], Any]]:
    """Every (container, key-or-index) in a document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield node, key
            yield from _nodes(value)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield node, index
            yield from _nodes(value)


def _mappings(node: object) -> Iterator[dict[Any, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _mappings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _mappings(value)


@st.composite
def mutated_documents(draw: st.DrawFn) -> object:
    """A valid document with one to four keys dropped, values replaced, or keys added."""
    doc: object = copy.deepcopy(draw(st.sampled_from([FULL_SERVER, FULL_CLIENT, FULL_UNIX, S, C, U])))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        operation = draw(st.sampled_from(["drop", "replace", "add"]))
        nodes = list(_nodes(doc))
        if operation == "add" or not nodes:
            mapping = draw(st.sampled_from(list(_mappings(doc)) or [{}]))
            mapping[draw(KEYS)] = draw(VALUES)
            continue
        container, key = draw(st.sampled_from(nodes))
        if operation == "drop":
            del container[key]
        else:
            container[key] = draw(VALUES)
    return doc


SECTIONS = {
    "": sorted(TOP_KEYS),
    "tls": sorted(TLS_KEYS),
    "allow": sorted(ALLOW_KEYS),
    "limits": sorted(LIMIT_KEYS),
    "unix": sorted(UNIX_KEYS),
    "metrics": sorted(METRICS_KEYS),
}


@st.composite
def section_documents(draw: st.DrawFn) -> object:
    """A valid document with one to three known keys of one section set to random data."""
    doc = copy.deepcopy(draw(st.sampled_from([FULL_SERVER, FULL_CLIENT, FULL_UNIX])))
    section = draw(st.sampled_from(sorted(SECTIONS)))
    target = doc if not section else doc.setdefault(section, {})
    for key in draw(st.lists(st.sampled_from(SECTIONS[section]), min_size=1, max_size=3, unique=True)):
        target[key] = draw(st.one_of(SCALARS, VALUES))
    return doc


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki_files(tmp_path_factory.mktemp("fuzz"))


def _check_outcome(outcome: Callable[[], TunnelConfig], path: Path) -> None:
    """`outcome()` returns a sane TunnelConfig or raises ConfigError naming `path`; nothing else."""
    error: ConfigError | None = None
    try:
        config = outcome()
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert error.file == str(path)
        assert str(error).startswith(f"{path}: ")
        return
    assert config.mode in ("server", "client")
    assert (config.allow is not None) == (config.mode == "server")
    assert config.targets
    limits = config.limits
    for seconds in (limits.handshake_timeout, limits.connect_timeout, limits.drain_timeout):
        assert math.isfinite(seconds)
        assert seconds > 0
    assert limits.idle_timeout is None or (math.isfinite(limits.idle_timeout) and limits.idle_timeout > 0)
    assert limits.max_connections >= 1
    assert 1 <= limits.per_source_handshakes <= limits.max_handshakes <= limits.max_connections
    assert limits.per_source_handshakes <= limits.per_source_connections <= limits.max_connections
    assert 1 <= limits.per_identity_connections <= limits.max_connections
    assert 0 <= config.unix.mode <= 0o777
    assert config.listen.is_unix or config.unix == UnixSocket()
    assert isinstance(config.metrics.per_identity, bool)
    assert config.metrics.max_identities >= 1


FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@FUZZ
@given(document=st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=8), mutated_documents(), section_documents()))
def test_parse_document_only_raises_config_error(fuzz_dir: Path, document: object) -> None:
    path = fuzz_dir / "fuzz.yaml"
    _check_outcome(lambda: parse_document(document, path), path)


YAML_TOKENS = st.sampled_from(
    [
        "\n",
        "  ",
        ": ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ", ",
        "'",
        '"',
        "#",
        "&a ",
        "*a",
        "<<: ",
        "? ",
        "|\n",
        "!!int ",
        "!!float ",
        "!!bool ",
        "!!timestamp ",
        "!!binary ",
        "!!set ",
        "!!omap ",
        "!!python/object ",
        "2001-02-30",
        "2001-12-14t21:59:43.10-05:00",
        "0x" + "f" * 30,
        "1" + "0" * 400,
        ".nan",
        ".inf",
        "~",
        "yes",
        "mode",
        "server",
        "client",
        "listen",
        "target",
        "tls",
        "cert",
        "cert.pem",
        "allow",
        "any",
        "true",
        "limits",
        "idle_timeout",
        "127.0.0.1:1",
        "[::1]:2",
    ]
)
TEXTS = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(YAML_TOKENS, st.text(max_size=3)), max_size=40).map("".join),
    st.builds(
        lambda text, cut, insert: text[:cut] + insert + text[cut:],
        st.sampled_from([yaml.safe_dump(FULL_SERVER), yaml.safe_dump(FULL_CLIENT)]),
        st.integers(min_value=0, max_value=400),
        st.lists(YAML_TOKENS, max_size=3).map("".join),
    ),
)


@FUZZ
@given(text=TEXTS)
def test_load_file_only_raises_config_error(fuzz_dir: Path, text: str) -> None:
    path = fuzz_dir / "fuzz-text.yaml"
    path.write_text(text, encoding="utf-8")
    _check_outcome(lambda: load_file(path), path)


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("0.0.0.0:6380", "127.0.0.1:6380", True),
        ("127.0.0.1:6380", "0.0.0.0:6380", True),
        ("[::]:6380", "0.0.0.0:6380", True),  # a dual-stack socket covers IPv4 too
        ("[::]:6380", "127.0.0.1:6380", True),
        ("[::]:6380", "[::1]:6380", True),
        ("0.0.0.0:6380", "[::1]:6380", False),
        ("127.0.0.1:6380", "127.0.0.2:6380", False),
        ("0.0.0.0:6380", "0.0.0.0:6381", False),
        ("0.0.0.0:0", "127.0.0.1:0", False),  # port 0: each gets its own
        ("127.0.0.1:6380", "127.0.0.1:6380", True),
        ("unix:/run/a.sock", "unix:/run/a.sock", True),
        ("unix:/run/a.sock", "0.0.0.0:6380", False),
        ("localhost:6380", "0.0.0.0:6380", False),  # a name: known only when bound
    ],
)
def test_listen_overlap(a: str, b: str, overlap: bool) -> None:
    assert listen_overlap(parse_address(a), parse_address(b)) is overlap
    assert listen_overlap(parse_address(b), parse_address(a)) is overlap


def test_two_tunnels_whose_listen_addresses_overlap_are_refused(tmp_path: Path) -> None:
    make_pki_files(tmp_path / "pki")
    tls = {"cert": "../pki/cert.pem", "key": "../pki/key.pem", "ca": "../pki/ca.pem"}
    conf = tmp_path / "conf"
    write_yaml(conf / "a.yaml", server_doc(listen="0.0.0.0:6380", tls=tls))
    write_yaml(conf / "b.yaml", server_doc(listen="127.0.0.1:6380", tls=tls))
    with pytest.raises(ConfigError, match=r"overlaps 0\.0\.0\.0:6380, the listen address in") as info:
        load_paths([conf])
    assert info.value.key == "listen"
    assert info.value.file.endswith("b.yaml")


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ({}, (1024, 256, 32, 256, 1024)),
        ({"max_connections": 50}, (50, 50, 32, 50, 50)),
        ({"max_connections": 10}, (10, 10, 10, 10, 10)),
        ({"max_connections": 50, "max_handshakes": 20}, (50, 20, 20, 50, 50)),
        ({"per_source": {"connections": 8}}, (1024, 256, 8, 8, 1024)),
        (
            {
                "max_connections": 50,
                "max_handshakes": 20,
                "per_source": {"handshakes": 10, "connections": 30},
                "per_identity_connections": 5,
            },
            (50, 20, 10, 30, 5),
        ),
    ],
)
def test_connection_caps_default_from_max_connections(
    tmp_path: Path, written: dict[str, Any], expected: tuple[int, ...]
) -> None:
    """max_handshakes = min(256, max_connections), per_source.handshakes = min(32,
    max_handshakes, per_source.connections), per_source.connections = min(256,
    max_connections), per_identity_connections = max_connections, unless written."""
    make_pki_files(tmp_path)
    limits = load_file(write_yaml(tmp_path / "t.yaml", {**S, "limits": written})).limits
    assert (
        limits.max_connections,
        limits.max_handshakes,
        limits.per_source_handshakes,
        limits.per_source_connections,
        limits.per_identity_connections,
    ) == expected


# -- protocol and sni ----------------------------------------------------------------------


def test_protocol_defaults_to_tcp_and_takes_postgres(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    assert load_file(write_yaml(tmp_path / "a.yaml", server_doc())).protocol == "tcp"
    assert load_file(write_yaml(tmp_path / "b.yaml", client_doc(protocol="postgres"))).protocol == "postgres"
    with pytest.raises(ConfigError) as caught:
        load_file(write_yaml(tmp_path / "c.yaml", server_doc(protocol="mysql")))
    assert caught.value.key == "protocol"
    assert "tcp or postgres" in caught.value.message


@pytest.mark.parametrize(
    ("sni", "key", "words"),
    [
        ([], "sni", "empty"),
        (["bad name"], "sni[0]", "not a host name"),
        (["a.example", "A.example."], "sni[1]", "twice"),
        (["x.*.example"], "sni[0]", "not a host name"),
        ([7], "sni[0]", "expected a server name"),
    ],
)
def test_sni_names_are_checked(tmp_path: Path, sni: list[Any], key: str, words: str) -> None:
    make_pki_files(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_file(write_yaml(tmp_path / "a.yaml", server_doc(sni=sni)))
    assert caught.value.key == key
    assert words in caught.value.message


def test_sni_is_only_for_server_tunnels(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_file(write_yaml(tmp_path / "a.yaml", client_doc(sni=["a.example"])))
    assert caught.value.key == "sni"


def test_sni_names_are_lower_cased_without_a_trailing_dot(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    config = load_file(write_yaml(tmp_path / "a.yaml", server_doc(sni=["Redis.Internal.", "*.Example", "*"])))
    assert config.sni == ("redis.internal", "*.example", "*")


def test_tunnels_naming_distinct_server_names_share_a_listen_address(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    write_yaml(tmp_path / "a.yaml", server_doc(name="a", sni=["a.example"]))
    write_yaml(tmp_path / "b.yaml", server_doc(name="b", sni=["b.example", "*.b.example"]))
    write_yaml(tmp_path / "c.yaml", server_doc(name="c", sni=["*"]))
    assert [c.name for c in load_paths([tmp_path])] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("first", "second"),
    [(["a.example"], ["A.example"]), (["*.example"], ["x.example"]), (["*"], ["*"]), (["*.e"], ["*.e"])],
)
def test_check_refuses_server_names_two_tunnels_on_one_address_both_admit(
    tmp_path: Path, first: list[str], second: list[str]
) -> None:
    make_pki_files(tmp_path)
    write_yaml(tmp_path / "a.yaml", server_doc(name="a", sni=first))
    b = write_yaml(tmp_path / "b.yaml", server_doc(name="b", sni=second))
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path])
    assert (caught.value.file, caught.value.key) == (str(b), "sni")
    assert "each name must pick one tunnel" in caught.value.message


def test_check_refuses_a_shared_address_where_a_tunnel_names_no_server_names(tmp_path: Path) -> None:
    make_pki_files(tmp_path)
    write_yaml(tmp_path / "a.yaml", server_doc(name="a", sni=["a.example"]))
    b = write_yaml(tmp_path / "b.yaml", server_doc(name="b"))
    with pytest.raises(ConfigError) as caught:
        load_paths([tmp_path])
    assert (caught.value.file, caught.value.key) == (str(b), "listen")
    assert "only when each names its server names (sni)" in caught.value.message
