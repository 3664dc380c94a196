"""One-time enrollment tokens: what `tunnel ca token` prints and `simpleenroll` redeems.

A token is `secrets.token_urlsafe(24)` (192 random bits). The CA directory keeps only its
SHA-256 (hex) in tokens.json (mode 0600, replaced atomically, under an flock of
tokens.lock so that `tunnel ca token` and `tunnel ca serve` can run at once), bound to the
certificate it allows: name, kind ("server" or "client"), SANs, lifetime in days, and
the token's own expiry. Redeeming
removes it: a token works once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnel import pki

TOKENS_FILE = "tokens.json"
LOCK_FILE = "tokens.lock"
MAX_TTL = dt.timedelta(days=30)


class TokenError(Exception):
    """A token that cannot be redeemed: unknown (never issued, or already used) or expired."""


@dataclass(frozen=True)
class Grant:
    """What a token allows: one certificate NAME of `kind` with exactly these SANs."""

    name: str
    kind: str
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    days: int = 30


def hash_token(token: str) -> str:
    """SHA-256 of the token's UTF-8 bytes, lowercase hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def create(
    directory: Path,
    name: str,
    *,
    kind: str,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    uris: Sequence[str] = (),
    days: int = 30,
    ttl: dt.timedelta = dt.timedelta(hours=1),
    now: dt.datetime | None = None,
) -> str:
    """Make a token for `name` and return it (the only copy: the CA keeps its hash).
    Errors: pki.PKIError for a bad name, kind, SAN or ttl (more than MAX_TTL, or not
    positive), or a directory that is no CA."""
    pki._check_name(name)
    if kind not in pki.KINDS:
        raise pki.PKIError(f"unknown certificate kind {kind!r}; expected one of {', '.join(pki.KINDS)}")
    pki._subject_alt_names(dns, ips, uris)  # checks each value
    pki._check_days(days)
    if not dt.timedelta(0) < ttl <= MAX_TTL:
        raise pki.PKIError(f"invalid --ttl {ttl}: must be positive and at most {MAX_TTL.days} days")
    pki._load_ca_cert(directory)
    if kind == "server" and not (dns or ips or uris):
        dns = (name,)  # as `tunnel ca issue` does
    token = secrets.token_urlsafe(24)
    expires = (now or pki._now()) + ttl
    with _locked(directory):
        table = _load(directory)
        table[hash_token(token)] = {
            "name": name,
            "kind": kind,
            "dns": list(dns),
            "ips": list(ips),
            "uris": list(uris),
            "days": days,
            "expires": expires.isoformat(),
        }
        _save(directory, table, now or pki._now())
    return token


def redeem(directory: Path, token: str, *, now: dt.datetime | None = None) -> Grant:
    """Use `token` up: return its Grant and forget it. Errors: TokenError if it is
    unknown (never issued, or used already) or expired (then it is forgotten too)."""
    now = now or pki._now()
    with _locked(directory):
        table = _load(directory)
        entry = table.pop(hash_token(token), None)
        if entry is None:
            raise TokenError("unknown or already used enrollment token")
        _save(directory, table, now)
    if dt.datetime.fromisoformat(entry["expires"]) <= now:
        raise TokenError(f"enrollment token for {entry['name']!r} expired at {entry['expires']}")
    return Grant(
        entry["name"], entry["kind"], tuple(entry["dns"]), tuple(entry["ips"]), tuple(entry["uris"]), entry["days"]
    )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / TOKENS_FILE
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise pki.PKIError(f"cannot read {path}: {exc}") from exc
    if not isinstance(table, dict):
        raise pki.PKIError(f"{path} is not a JSON object")
    return table


def _save(directory: Path, table: dict[str, dict[str, Any]], now: dt.datetime) -> None:
    """Write the table without the expired entries, atomically, mode 0600."""
    live = {key: value for key, value in table.items() if dt.datetime.fromisoformat(str(value["expires"])) > now}
    pki._write(directory / TOKENS_FILE, json.dumps(live, indent=1, sort_keys=True).encode(), mode=0o600)
