"""Tunnel YAML files → frozen, typed configuration; every error names the file and key path."""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import math
import os
import pwd
import re
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from tunnel.file_safety import UnsafeFile, check_file
from tunnel.identity import AllowRule, normalize_fingerprint

Mode = Literal["server", "client"]
WireProtocol = Literal["tcp", "postgres"]


class ConfigError(Exception):
    """A configuration file is wrong: which file, which key, and what is wrong with it."""

    def __init__(self, file: Path | str, key: str, message: str) -> None:
        self.file = str(file)
        self.key = key
        self.message = message
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class Address:
    """A TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def format_sockaddr(address: Any) -> str:
    """A socket address as accept(), getsockname() or getaddrinfo() give it, written as
    in a tunnel file: `HOST:PORT`, `[V6]:PORT`, `unix:PATH` (`unix` for an unnamed one)."""
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix" if not address else f"unix:{address}"


@dataclass(frozen=True)
class Renew:
    """`tls.renew`: re-enroll over EST (RFC 7030 section 4.2.2, simplereenroll) at `url`
    (https://HOST[:PORT]) when `fraction` of the certificate's lifetime is left, or
    `seconds` before it expires (exactly one of the two is set)."""

    url: str
    fraction: float | None = 0.33
    seconds: float | None = None


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    ca: Path
    crl: tuple[Path, ...] = ()  # one CRL file per issuing CA
    server_name: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    key_password_file: Path | None = None  # the password of an encrypted tls.key
    renew: Renew | None = None  # tls.renew: renew the certificate over EST before it expires


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0
    idle_timeout: float | None = 3600.0  # None: never
    max_connections: int = 1024
    drain_timeout: float = 30.0
    # 0 below means "the default", worked out from the caps above (see __post_init__).
    max_handshakes: int = 0  # min(256, max_connections)
    per_source_handshakes: int = 0  # limits.per_source.handshakes: min(32, max_handshakes)
    per_source_connections: int = 0  # limits.per_source.connections: min(256, max_connections)
    per_identity_connections: int = 0  # max_connections
    close_on_expiry: bool = True  # close a connection when its peer's certificate expires

    def __post_init__(self) -> None:
        derived = {
            "max_handshakes": min(256, self.max_connections),
            "per_source_connections": min(256, self.max_connections),
            "per_identity_connections": self.max_connections,
        }
        for key, value in derived.items():
            if not getattr(self, key):
                object.__setattr__(self, key, value)
        if not self.per_source_handshakes:
            value = min(32, self.max_handshakes, self.per_source_connections)
            object.__setattr__(self, "per_source_handshakes", value)


@dataclass(frozen=True)
class UnixSocket:
    """`unix:`: the listen socket file's permissions, and which local processes may use it.

    Names are resolved to numeric ids when the file is loaded (again on every reload)."""

    mode: int = 0o600  # permission bits of the socket file (connecting needs write permission)
    group: int | None = None  # gid the socket file is chowned to; None: the daemon's own group
    allow_users: frozenset[int] | None = None  # uids that may connect; None: no uid rule
    allow_groups: frozenset[int] | None = None  # gids that may connect; None: no group rule

    @property
    def checks_peers(self) -> bool:
        return self.allow_users is not None or self.allow_groups is not None


@dataclass(frozen=True)
class MetricsConfig:
    """`metrics:`: what /metrics counts besides the per-tunnel series.

    With `per_identity`, connections opened, refused (when the peer's certificate was
    read) and closed, and bytes relayed, are also counted per peer identity (its
    Identity.describe(), as logged: `cn=app1`), in the tunnel_identity_* series; at most
    `max_identities` distinct identities per tunnel get a series of their own, later ones
    count under identity="other" (a bounded number of series, whoever connects)."""

    per_identity: bool = False
    max_identities: int = 100


@dataclass(frozen=True)
class TunnelConfig:
    name: str
    mode: Mode
    listen: Address
    targets: tuple[Address, ...]
    tls: TLSConfig
    source: Path
    allow: AllowRule | None = None
    limits: Limits = field(default_factory=Limits)
    status: Address | None = None  # where to serve /healthz, /metrics, /connections
    proxy_protocol: Literal["v2"] | None = None
    workers: int = 1  # processes for the whole daemon (the largest any file asks for)
    unix: UnixSocket = field(default_factory=UnixSocket)  # only used when listen is unix:
    protocol: WireProtocol = "tcp"  # postgres: PostgreSQL's SSLRequest before TLS (tunnel/postgres.py)
    sni: tuple[str, ...] = ()  # server names this tunnel answers on a shared listen address
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def files(self) -> set[Path]:
        """Every file this tunnel was configured from: the YAML file and what it names."""
        tls = self.tls
        optional = [tls.key_password_file] if tls.key_password_file is not None else []
        return {self.source, tls.cert, tls.key, tls.ca, *tls.crl, *optional}


TOP_KEYS = {
    "name",
    "mode",
    "listen",
    "target",
    "tls",
    "allow",
    "limits",
    "status",
    "proxy_protocol",
    "workers",
    "unix",
    "protocol",
    "sni",
    "metrics",
}
PROTOCOLS = ("tcp", "postgres")
METRICS_KEYS = {"per_identity", "max_identities"}
UNIX_KEYS = {"mode", "group", "allow_users", "allow_groups"}
TLS_KEYS = {"cert", "key", "ca", "crl", "server_name", "min_version", "key_password_file", "renew"}
RENEW_KEYS = {"url", "before"}
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$", re.ASCII)
ALLOW_KEYS = {"cn", "dns", "uri", "ou", "fingerprint", "any"}
LIMIT_KEYS = {
    "handshake_timeout",
    "connect_timeout",
    "idle_timeout",
    "max_connections",
    "drain_timeout",
    "max_handshakes",
    "per_source",
    "per_identity_connections",
    "close_on_expiry",
}
PER_SOURCE_KEYS = {"handshakes", "connections"}
_SERVER_NAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.ASCII)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """`500ms`, `10s`, `5m`, `1h` or a number of seconds → seconds. ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 10s, 5m, 1h")
    seconds: float | None = None
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds is None:
        raise ValueError(f"expected a duration such as 500ms, 10s, 5m, 1h, not {_show(value)}")
    if math.isnan(seconds):
        raise ValueError("expected a duration such as 500ms, 10s, 5m, 1h, not NaN")
    if seconds < 0:
        raise ValueError("must not be negative")
    if math.isinf(seconds):
        raise ValueError(f"{_show(value)} is too long a duration")
    return seconds


def parse_address(value: object) -> Address:
    """`HOST:PORT`, `[V6]:PORT` or `unix:/path` → Address. ValueError otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected HOST:PORT, [IPV6]:PORT or unix:/path, not {_show(value)}")
    text = value.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix: needs a socket path")
        return Address(path=path)
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPV6]:PORT, not {text!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, not {text!r}")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, not {_show(port_text)}")
    return Address(host=host, port=int(port_text))


class _Reader:
    """Walks one YAML document, naming the key path in every error."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.base = file.parent.absolute()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, key, message)

    def mapping(self, value: object, key: str, allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {_kind(value)}")
        for name in value:
            if not isinstance(name, str):
                raise self.error(key or "(top level)", f"keys must be strings, got {_show(name)}")
            if name not in allowed:
                where = f"{key}.{name}" if key else name
                raise self.error(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {_kind(value)}")
        return value.strip()

    def strings(self, value: object, key: str) -> frozenset[str]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_kind(value)}")
        return frozenset(self.string(item, f"{key}[{i}]") for i, item in enumerate(value))

    def file_path(self, value: object, key: str, *, secret: bool = False) -> Path:
        """A file the tunnel trusts: it must exist, be readable, and be safe from others
        (file_safety: no one but its owner may change it or a directory above it; with
        `secret`, not readable by every user either)."""
        path = self.base / Path(os.path.expanduser(self.string(value, key)))
        try:
            exists, is_file = path.exists(), path.is_file()
        except OSError as exc:  # e.g. ENAMETOOLONG, EACCES on a parent directory
            raise self.error(key, f"cannot use {path}: {exc.strerror or exc}") from None
        if not exists:
            raise self.error(key, f"file not found: {path}")
        if not is_file:
            raise self.error(key, f"not a regular file: {path}")
        if not os.access(path, os.R_OK):
            raise self.error(key, f"file not readable: {path}")
        try:
            check_file(path, secret=secret)
        except UnsafeFile as exc:
            raise self.error(key, str(exc)) from None
        except OSError as exc:
            raise self.error(key, f"cannot use {path}: {exc.strerror or exc}") from None
        return path

    def address(self, value: object, key: str) -> Address:
        """An address; a relative unix: path is relative to the YAML file, like tls files."""
        try:
            address = parse_address(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if address.path is not None and not os.path.isabs(address.path):
            return Address(path=str(self.base / address.path))
        return address

    def duration(self, value: object, key: str) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlong = 60
_REPR.maxlevel = 3
_SHOW_LIMIT = 160


def _show(value: object) -> str:
    """repr() for error messages: bounded in length and depth, and never raising."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int past sys.get_int_max_str_digits(), say
        return f"({_kind(value)} too large to show)"
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), f"a {type(value).__name__}"
    )


def load_file(path: Path) -> TunnelConfig:
    """Read and validate one tunnel file."""
    try:
        text = path.read_text(encoding="utf-8")
        check_file(path.absolute())  # it names the CA: as safe from others as the CA file
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except UnsafeFile as exc:
        raise ConfigError(path, "", str(exc)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read: {exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", f"not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(path, "", "not valid YAML: nested too deeply") from None
    except Exception as exc:  # PyYAML's constructors leak ValueError, KeyError, ... (e.g. a: 2001-02-30)
        raise ConfigError(path, "", f"not valid YAML: {type(exc).__name__}: {exc}") from None
    return parse_document(document, path)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(problem)


def parse_document(document: object, path: Path) -> TunnelConfig:
    """Validate an already-parsed YAML document that came from `path`."""
    r = _Reader(path)
    if document is None:
        raise r.error("", "the file is empty")
    top = r.mapping(document, "", TOP_KEYS)

    name = r.string(top.get("name", path.stem), "name")
    if not NAME_PATTERN.match(name):
        raise r.error("name", f"{name!r}: use letters, digits, '.', '_' and '-'")
    if "mode" not in top:
        raise r.error("mode", "required: server or client")
    mode = top["mode"]
    if mode not in ("server", "client"):
        raise r.error("mode", f"expected server or client, not {_show(mode)}")

    if "listen" not in top:
        raise r.error("listen", "required: HOST:PORT, [IPV6]:PORT or unix:/path")
    listen = r.address(top["listen"], "listen")

    if "target" not in top:
        raise r.error("target", "required: HOST:PORT or unix:/path, or a list of them")
    raw_targets = top["target"]
    if isinstance(raw_targets, list):
        if not raw_targets:
            raise r.error("target", "the list is empty")
        targets = tuple(r.address(t, f"target[{i}]") for i, t in enumerate(raw_targets))
    else:
        targets = (r.address(raw_targets, "target"),)
    for i, target in enumerate(targets):
        if not target.is_unix and target.port == 0:
            raise r.error("target" if len(targets) == 1 else f"target[{i}]", "port 0 is not a target")

    if "tls" not in top:
        raise r.error("tls", "required: cert, key and ca")
    tls = _parse_tls(r, top["tls"], mode, targets)

    allow: AllowRule | None = None
    if mode == "server":
        if "allow" not in top:
            raise r.error(
                "allow",
                "required in server mode: say who may connect (cn, dns, uri, "
                "ou, fingerprint), or write any: true to admit every certificate the "
                "CA signed",
            )
        allow = _parse_allow(r, top["allow"])
    elif "allow" in top:
        raise r.error("allow", "only for server mode (a client tunnel checks tls.server_name)")

    limits = _parse_limits(r, top.get("limits", {}))
    status = None
    if top.get("status") is not None:
        status = r.address(top["status"], "status")
        if status.is_unix:
            raise r.error("status", "expected HOST:PORT (a TCP address)")
    proxy_protocol: Literal["v2"] | None = None
    if top.get("proxy_protocol") is not None:
        if top["proxy_protocol"] != "v2":
            raise r.error("proxy_protocol", f"expected v2, not {_show(top['proxy_protocol'])}")
        if mode != "server":
            raise r.error("proxy_protocol", "only for server mode")
        proxy_protocol = "v2"
    workers = top.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise r.error("workers", f"expected a whole number from 1 to 256, not {_show(workers)}")
    unix = UnixSocket()
    if "unix" in top:
        if not listen.is_unix:
            raise r.error("unix", f"only for a unix: listen address (listen is {listen})")
        unix = _parse_unix(r, top["unix"])
    protocol: WireProtocol = top.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise r.error("protocol", f"expected {' or '.join(PROTOCOLS)}, not {_show(protocol)}")
    sni: tuple[str, ...] = ()
    if top.get("sni") is not None:
        if mode != "server":
            raise r.error("sni", "only for server mode (a client tunnel sends tls.server_name)")
        sni = _parse_sni(r, top["sni"])
    metrics = _parse_metrics(r, top["metrics"]) if top.get("metrics") is not None else MetricsConfig()
    return TunnelConfig(
        name=name,
        mode=mode,
        listen=listen,
        targets=targets,
        tls=tls,
        source=path,
        allow=allow,
        limits=limits,
        status=status,
        proxy_protocol=proxy_protocol,
        workers=workers,
        unix=unix,
        protocol=protocol,
        sni=sni,
        metrics=metrics,
    )


def _parse_metrics(r: _Reader, value: object) -> MetricsConfig:
    """`metrics: {per_identity: BOOL, max_identities: N}` (N a whole number, at least 1)."""
    metrics = r.mapping(value, "metrics", METRICS_KEYS)
    defaults = MetricsConfig()
    return MetricsConfig(
        per_identity=_flag(r, metrics, "per_identity", "metrics", defaults.per_identity),
        max_identities=_count(r, metrics, "max_identities", "metrics") or defaults.max_identities,
    )


def _parse_sni(r: _Reader, value: object) -> tuple[str, ...]:
    """`sni`: server names (RFC 6066 section 3: host names, compared without regard to
    case and a trailing dot), `*.domain` for any one label under domain, or `*` for any
    name and none at all. Returned lower-cased, in the order written."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise r.error("sni", "the list is empty: name the server names, or leave sni out")
    names: list[str] = []
    for i, item in enumerate(items):
        key = f"sni[{i}]" if isinstance(value, list) else "sni"
        if not isinstance(item, str) or not item.strip():
            raise r.error(key, f"expected a server name, not {_show(item)}")
        name = item.strip().lower().rstrip(".")
        bare = name.removeprefix("*.") if name != "*" else "x"
        if not _SERVER_NAME.match(bare):
            raise r.error(key, f"{item!r} is not a host name (letters, digits, '-' and '.'; '*.' only in front)")
        if name in names:
            raise r.error(key, f"{name!r} is named twice")
        names.append(name)
    return tuple(names)


def _sni_overlap(a: str, b: str) -> bool:
    """Whether two `sni` entries admit a name in common (two `*` fallbacks included)."""
    if "*" in (a, b):
        return a == b
    if a.startswith("*.") != b.startswith("*."):
        pattern, name = (a, b) if a.startswith("*.") else (b, a)
        return sni_matches(pattern, name)
    return a == b


def sni_matches(pattern: str, name: str | None) -> bool:
    """Whether an `sni` entry admits a ClientHello's server name (None: it sent none).
    `*` admits everything; `*.example.org` one label under example.org; else equality."""
    if pattern == "*":
        return True
    if name is None:
        return False
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return name == pattern


def _parse_tls(r: _Reader, value: object, mode: str, targets: tuple[Address, ...]) -> TLSConfig:
    tls = r.mapping(value, "tls", TLS_KEYS)
    for key in ("cert", "key", "ca"):
        if key not in tls:
            raise r.error(f"tls.{key}", "required")
    crl = _parse_crl(r, tls.get("crl"))
    password_file = tls.get("key_password_file")
    key_password_file = (
        r.file_path(password_file, "tls.key_password_file", secret=True) if password_file is not None else None
    )
    raw_min_version = tls.get("min_version", "1.2")
    # str() only what can be "1.2"/"1.3": a string, or the float of an unquoted 1.2
    min_version = str(raw_min_version) if isinstance(raw_min_version, str | float) else ""
    if min_version not in ("1.2", "1.3"):
        raise r.error("tls.min_version", f'expected "1.2" or "1.3", not {_show(raw_min_version)}')
    server_name: str | None = None
    if "server_name" in tls:
        if mode != "client":
            raise r.error("tls.server_name", "only for client mode")
        server_name = r.string(tls["server_name"], "tls.server_name")
    elif mode == "client" and any(t.is_unix for t in targets):
        # Without server_name each target is checked against its own host name.
        raise r.error("tls.server_name", "required when a target is a unix socket")
    return TLSConfig(
        cert=r.file_path(tls["cert"], "tls.cert"),
        key=r.file_path(tls["key"], "tls.key", secret=True),
        ca=r.file_path(tls["ca"], "tls.ca"),
        crl=crl,
        server_name=server_name,
        min_version="1.3" if min_version == "1.3" else "1.2",
        key_password_file=key_password_file,
        renew=_parse_renew(r, tls["renew"]) if tls.get("renew") is not None else None,
    )


def _parse_renew(r: _Reader, value: object) -> Renew:
    """`tls.renew: {url: https://HOST[:PORT], before: 33% | DURATION}`."""
    renew = r.mapping(value, "tls.renew", RENEW_KEYS)
    if "url" not in renew:
        raise r.error("tls.renew.url", "required")
    url = r.string(renew["url"], "tls.renew.url")
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme != "https" or not parts.hostname or not port_ok or parts.path not in ("", "/"):
        raise r.error("tls.renew.url", f"expected https://HOST[:PORT], not {_show(url)}")
    before = renew.get("before", "33%")
    match = _PERCENT.match(before) if isinstance(before, str) else None
    if match:
        percent = float(match.group(1))
        if not 1 <= percent <= 99:
            raise r.error("tls.renew.before", f"a share of the lifetime must be from 1% to 99%, not {_show(before)}")
        return Renew(url=url, fraction=percent / 100, seconds=None)
    try:
        seconds = parse_duration(before)
    except ValueError as exc:
        raise r.error(
            "tls.renew.before", f"expected a percentage such as 33% or a duration such as 8h: {exc}"
        ) from None
    if seconds <= 0:
        raise r.error("tls.renew.before", "must be more than zero")
    return Renew(url=url, fraction=None, seconds=seconds)


def _parse_crl(r: _Reader, value: object) -> tuple[Path, ...]:
    """`tls.crl`: one file, or a list of them (one per issuing CA)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        return (r.file_path(value, "tls.crl"),)
    if not value:
        raise r.error("tls.crl", "the list is empty (leave tls.crl out to check no CRL)")
    return tuple(dict.fromkeys(r.file_path(item, f"tls.crl[{i}]") for i, item in enumerate(value)))


def _parse_allow(r: _Reader, value: object) -> AllowRule:
    allow = r.mapping(value, "allow", ALLOW_KEYS)
    any_value = allow.get("any", False)
    if not isinstance(any_value, bool):
        raise r.error("allow.any", f"expected true or false, got {_kind(any_value)}")
    lists = {
        key: r.strings(allow[key], f"allow.{key}") if allow.get(key) is not None else frozenset()
        for key in ("cn", "dns", "uri", "ou", "fingerprint")
    }
    # Index the raw list (already checked to be strings), not the sorted, deduplicated set.
    raw_fingerprints = allow.get("fingerprint")
    if isinstance(raw_fingerprints, list):
        for i, fp in enumerate(raw_fingerprints):
            _check_fingerprint(r, fp, f"allow.fingerprint[{i}]")
    elif raw_fingerprints is not None:
        _check_fingerprint(r, raw_fingerprints, "allow.fingerprint")
    if not any_value and not any(lists.values()):
        raise r.error("allow", "admits nobody: list cn, dns, uri, ou or fingerprint, or write any: true")
    return AllowRule(any=any_value, **lists)


def _check_fingerprint(r: _Reader, fp: str, key: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{64}", normalize_fingerprint(fp)):
        raise r.error(key, f"{_show(fp)} is not a SHA-256 hex fingerprint")


_MODE = re.compile(r"(?:0o?)?([0-7]{3})", re.ASCII)
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to chown(2)


def _parse_unix(r: _Reader, value: object) -> UnixSocket:
    unix = r.mapping(value if value is not None else {}, "unix", UNIX_KEYS)
    mode = 0o600
    if unix.get("mode") is not None:
        raw = unix["mode"]
        if isinstance(raw, int) and not isinstance(raw, bool):
            # Unquoted, YAML reads 0660 as the octal 432 and 660 as the decimal 660.
            raise r.error("unix.mode", f'write the octal mode as a quoted string, e.g. "0660", not {_show(raw)}')
        match = _MODE.fullmatch(raw) if isinstance(raw, str) else None
        if match is None:
            raise r.error("unix.mode", f'expected an octal mode from "0000" to "0777", e.g. "0660", not {_show(raw)}')
        mode = int(match.group(1), 8)
    group = _unix_id(r, unix["group"], "unix.group", "group") if unix.get("group") is not None else None
    rules: dict[str, frozenset[int] | None] = {}
    kinds: tuple[tuple[str, Literal["user", "group"]], ...] = (("allow_users", "user"), ("allow_groups", "group"))
    for key, kind in kinds:
        raw_list = unix.get(key)
        if raw_list is None:
            rules[key] = None
            continue
        if not isinstance(raw_list, list):
            rules[key] = frozenset({_unix_id(r, raw_list, f"unix.{key}", kind)})
            continue
        if not raw_list:
            raise r.error(f"unix.{key}", "the list is empty (leave the key out to admit whoever may open the socket)")
        rules[key] = frozenset(_unix_id(r, item, f"unix.{key}[{i}]", kind) for i, item in enumerate(raw_list))
    return UnixSocket(mode=mode, group=group, allow_users=rules["allow_users"], allow_groups=rules["allow_groups"])


def _unix_id(r: _Reader, value: object, key: str, kind: Literal["user", "group"]) -> int:
    """A user or group name (looked up now: pwd/grp) or a numeric id → the numeric id."""
    if isinstance(value, bool) or not isinstance(value, int | str) or (isinstance(value, str) and not value.strip()):
        raise r.error(key, f"expected a {kind} name or a numeric id, got {_kind(value)}")
    text = value.strip() if isinstance(value, str) else ""
    if isinstance(value, int) or (text.isascii() and text.isdigit()):
        number = value if isinstance(value, int) else int(text) if len(text) <= 10 else -1
        if not 0 <= number <= _MAX_ID:
            raise r.error(key, f"{_show(value)} is not a valid {kind} id")
        return number
    try:
        return pwd.getpwnam(text).pw_uid if kind == "user" else grp.getgrnam(text).gr_gid
    except KeyError:
        raise r.error(key, f"no such {kind}: {_show(text)}") from None
    except (OSError, ValueError) as exc:  # e.g. an embedded NUL, or an NSS failure
        raise r.error(key, f"cannot look up {kind} {_show(text)}: {exc}") from None


def _parse_limits(r: _Reader, value: object) -> Limits:
    limits = r.mapping(value if value is not None else {}, "limits", LIMIT_KEYS)
    defaults = Limits()
    durations: dict[str, float] = {}
    for key in ("handshake_timeout", "connect_timeout", "drain_timeout", "idle_timeout"):
        if key in limits:
            durations[key] = r.duration(limits[key], f"limits.{key}")
            if key != "idle_timeout" and durations[key] <= 0:
                raise r.error(f"limits.{key}", "must be more than zero")
    max_connections = _count(r, limits, "max_connections", "limits") or defaults.max_connections
    per_source = r.mapping(limits.get("per_source", {}), "limits.per_source", PER_SOURCE_KEYS)
    counts = {
        "max_handshakes": _count(r, limits, "max_handshakes", "limits"),
        "per_source_handshakes": _count(r, per_source, "handshakes", "limits.per_source"),
        "per_source_connections": _count(r, per_source, "connections", "limits.per_source"),
        "per_identity_connections": _count(r, limits, "per_identity_connections", "limits"),
    }
    caps = Limits(  # the unset ones worked out
        max_connections=max_connections,
        max_handshakes=counts["max_handshakes"],
        per_source_handshakes=counts["per_source_handshakes"],
        per_source_connections=counts["per_source_connections"],
        per_identity_connections=counts["per_identity_connections"],
    )
    for key, value, cap, cap_key in (
        ("limits.max_handshakes", counts["max_handshakes"], max_connections, "limits.max_connections"),
        ("limits.per_source.connections", counts["per_source_connections"], max_connections, "limits.max_connections"),
        ("limits.per_source.handshakes", counts["per_source_handshakes"], caps.max_handshakes, "limits.max_handshakes"),
        (
            "limits.per_source.handshakes",
            counts["per_source_handshakes"],
            caps.per_source_connections,
            "limits.per_source.connections",
        ),
        (
            "limits.per_identity_connections",
            counts["per_identity_connections"],
            max_connections,
            "limits.max_connections",
        ),
    ):
        if value > cap:
            raise r.error(key, f"{value} is more than {cap_key} ({cap}), so it could never be reached")
    idle = durations.get("idle_timeout", defaults.idle_timeout)
    return Limits(
        handshake_timeout=durations.get("handshake_timeout", defaults.handshake_timeout),
        connect_timeout=durations.get("connect_timeout", defaults.connect_timeout),
        idle_timeout=None if idle == 0 else idle,
        max_connections=max_connections,
        drain_timeout=durations.get("drain_timeout", defaults.drain_timeout),
        close_on_expiry=_flag(r, limits, "close_on_expiry", "limits", defaults.close_on_expiry),
        max_handshakes=caps.max_handshakes,
        per_source_handshakes=caps.per_source_handshakes,
        per_source_connections=caps.per_source_connections,
        per_identity_connections=caps.per_identity_connections,
    )


def _flag(r: _Reader, mapping: Mapping[str, Any], name: str, section: str, default: bool) -> bool:
    """The boolean at `section.name` (true or false, as YAML writes them), or `default`."""
    value = mapping.get(name, default)
    if not isinstance(value, bool):
        raise r.error(f"{section}.{name}", f"expected true or false, not {_show(value)}")
    return value


def _count(r: _Reader, mapping: Mapping[str, Any], name: str, section: str) -> int:
    """The whole number (at least 1) at `section.name`; 0 (meaning: the default) if unset."""
    if name not in mapping:
        return 0
    value, key = mapping[name], f"{section}.{name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise r.error(key, f"expected a whole number, got {_kind(value)}")
    if value < 1:
        raise r.error(key, "must be at least 1")
    return value


def find_files(paths: Iterable[Path]) -> list[Path]:
    """Expand PATH arguments: a file is itself, a directory is its *.yaml and *.yml files."""
    files: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                raise ConfigError(path, "", "no *.yaml files in this directory")
            resolved = [(p, p.resolve()) for p in found]
            files.extend(p for p, real in resolved if real not in seen)
            seen.update(real for _, real in resolved)
        elif path.exists():
            real = path.resolve()
            if real not in seen:
                files.append(path)
                seen.add(real)
        else:
            raise ConfigError(path, "", "file not found")
    return files


def status_addresses(given: Iterable[Address], configs: Iterable[TunnelConfig]) -> list[Address]:
    """Where to serve status: the addresses given (`--status`), then each tunnel's
    `status:`, each address once, in that order."""
    return list(dict.fromkeys([*given, *(c.status for c in configs if c.status is not None)]))


def status_origin(address: Address, given: Iterable[Address], configs: Iterable[TunnelConfig]) -> str:
    """What asked for a status address, for error messages: `--status`, or the files'
    `status:` key."""
    if address in given:
        return f"--status {address}"
    files = [str(c.source) for c in configs if c.status == address]
    return f"{', '.join(files) or '?'}: status"


def watched_files(paths: Sequence[Path], configs: Iterable[TunnelConfig]) -> tuple[list[Path], list[Path]]:
    """What to watch for a reload: (every file the configs name, plus the tunnel files the
    PATH arguments hold now; the directories among the PATH arguments, for new files)."""
    files: set[Path] = set()
    with contextlib.suppress(ConfigError):
        files.update(find_files(paths))
    for config in configs:
        files.update(config.files())
    return sorted(files), [p for p in paths if p.is_dir()]


def load_paths(paths: Iterable[Path]) -> list[TunnelConfig]:
    """Load every tunnel file named (directly or through a directory); names and listen
    addresses must be unique across them."""
    configs = [load_file(p) for p in find_files(paths)]
    seen_names: dict[str, Path] = {}
    seen_listen: list[TunnelConfig] = []
    for config in configs:
        if config.name in seen_names:
            raise ConfigError(config.source, "name", f"{config.name!r} is also the name in {seen_names[config.name]}")
        seen_names[config.name] = config.source
        for other in seen_listen:
            if listen_overlap(config.listen, other.listen):
                _check_shared_listen(config, other)
        seen_listen.append(config)
    return configs


def _check_shared_listen(config: TunnelConfig, other: TunnelConfig) -> None:
    """Two tunnels may share a listen address only when it is the same address and both
    name their server names (`sni`), none of which the other's also admits (`*`, the
    fallback for names nobody claims, excepted: one per address). ConfigError if not."""
    source = other.source
    if config.listen != other.listen:
        raise ConfigError(
            config.source,
            "listen",
            f"{config.listen} overlaps {other.listen}, the listen address in {source}: both cannot be bound",
        )
    if not config.sni or not other.sni:
        raise ConfigError(
            config.source,
            "listen",
            f"{config.listen} is also the listen address in {source}: tunnels share a listen address"
            " only when each names its server names (sni)",
        )
    for name in config.sni:
        for theirs in other.sni:
            if _sni_overlap(name, theirs):
                raise ConfigError(
                    config.source,
                    "sni",
                    f"{name!r} overlaps {theirs!r}, a server name of tunnel {other.name} on {config.listen}"
                    f" ({source}): each name must pick one tunnel",
                )


_WILDCARDS = {"0.0.0.0": 4, "::": 6}


def listen_overlap(a: Address, b: Address) -> bool:
    """Whether two listen addresses cannot both be bound (Linux): the same path, or the
    same port (not 0) on the same host, or where one is a wildcard covering the other:
    0.0.0.0 covers every IPv4 address, and :: every address, IPv4 too (a dual-stack
    socket, as the tunnel binds them: ipv6(7), IPV6_V6ONLY off)."""
    if a.is_unix or b.is_unix:
        return a.path == b.path
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    families = {_family(a.host), _family(b.host)}
    if "::" in (a.host, b.host):
        return None not in families
    if "0.0.0.0" in (a.host, b.host):
        return families == {4}
    return False


def _family(host: str) -> int | None:
    if host in _WILDCARDS:
        return _WILDCARDS[host]
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None  # a name: which addresses it means is known only when it is bound
