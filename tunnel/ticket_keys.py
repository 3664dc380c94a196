"""The session-ticket keys of a server tunnel, and the one secret they derive from.

A server tunnel resumes TLS sessions from stateless tickets (RFC 8446 section 4.6.1, RFC
5077): the session, encrypted and authenticated under a key only the server knows, is
kept by the client. Every process that has the same keys resumes the same tickets: the
workers of `tunnel run --workers N`, a worker started again, and the new process of a
hand-over. So the keys are not random per process but derived, with HKDF-SHA256 (RFC
5869, `cryptography`'s HKDF), from one master secret per process tree, the tunnel's
trust settings and the hour:

    period n = floor(unix time / PERIOD)          (PERIOD = 3600 s)
    keys(n)  = HKDF(secret, info = INFO | scope | n) -> 16-byte key name,
               32-byte HMAC-SHA256 key, 32-byte AES-256-CBC key

The keys of period n encrypt new tickets; those of n and n-1 decrypt (a ticket under
n-1 resumes and is replaced by one under n); anything older is not recognised and the
client makes a full handshake. Every process computes the same keys with no channel
between them, and they rotate every hour by themselves. `scope` is a digest of the
tunnel's name and trust (`trust_scope`: its CA certificates and CRLs): a reload that
changes the CA or a CRL changes every key, so a session never outlives the trust
settings it was established under, and one tunnel never resumes another's sessions.

The master secret: 32 random bytes (`os.urandom`) made by the first process, kept in
memory only and never written anywhere: not to disk, not to an environment variable, not
to argv. A process hands it to a child it starts through a pipe the child inherits:

    passed = pass_secret()                       # this process's secret, in a new pipe
    try:
        subprocess.Popen(cmd, pass_fds=[passed.fd], env={**os.environ, **passed.env})
        # or trio.lowlevel.open_process(..., pass_fds=[...], env=...)
    finally:
        passed.close()                           # the parent's copy of the read end

`passed.env` is {SECRET_FD_ENV: "<fd number>"}: only the number of the inherited
descriptor, never the secret. The child's first `process_secret()` reads the secret
from that descriptor (to its end), closes it and removes SECRET_FD_ENV from its
environment; without SECRET_FD_ENV it makes a new secret. The supervisor of `--workers`
passes it to each worker it starts (so a worker started again resumes its predecessor's
tickets); a hand-over (a new `tunnel run` process taking over from this one) passes it
the same way, so clients resume across it. A restart that is not a hand-over starts with
a new secret: its tickets are not recognised, and clients make one full handshake.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding

from tunnel.trust import Trust

SECRET_FD_ENV = "TUNNEL_TICKET_SECRET_FD"
SECRET_BYTES = 32
PERIOD = 3600  # seconds a key pair encrypts new tickets; tickets decrypt for one more
INFO = b"tunnel session ticket keys v1\x00"
NAME_BYTES, HMAC_BYTES, AES_BYTES = 16, 32, 32  # OpenSSL's ticket key name and keys (ssl.h)

_secret: bytes | None = None


class SecretError(Exception):
    """The descriptor named by SECRET_FD_ENV held no secret (or is not a descriptor)."""


def create_secret() -> bytes:
    """A new master secret: SECRET_BYTES from os.urandom."""
    return os.urandom(SECRET_BYTES)


def process_secret() -> bytes:
    """This process's master secret: received from the parent (`receive_secret`) if it
    passed one, else created; the same bytes for the life of the process. SecretError
    if SECRET_FD_ENV names a descriptor that holds no secret."""
    global _secret
    if _secret is None:
        _secret = receive_secret() or create_secret()
    return _secret


def receive_secret(environ: MutableMapping[str, str] | None = None) -> bytes | None:
    """Read the secret a parent passed (see the module docstring): from the descriptor
    SECRET_FD_ENV names in `environ` (os.environ by default), to its end; the descriptor is
    closed and SECRET_FD_ENV removed. None when SECRET_FD_ENV is not set. SecretError if
    it is not a descriptor number, or what it holds is not SECRET_BYTES long."""
    environ = os.environ if environ is None else environ
    value = environ.pop(SECRET_FD_ENV, None)
    if value is None:
        return None
    try:
        fd = int(value)
    except ValueError:
        raise SecretError(f"{SECRET_FD_ENV}={value!r} is not a descriptor number") from None
    data = b""
    try:
        while chunk := os.read(fd, 64):
            data += chunk
            if len(data) > SECRET_BYTES:
                break
    except OSError as exc:
        raise SecretError(f"cannot read the ticket secret from descriptor {fd}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(data) != SECRET_BYTES:
        raise SecretError(f"descriptor {fd} ({SECRET_FD_ENV}) held {len(data)} bytes, not a {SECRET_BYTES}-byte secret")
    return data


@dataclass
class PassedSecret:
    """A secret on its way to a child: `fd`, the read end of a pipe holding it (to list in
    pass_fds), and `env`, the variable naming it (to add to the child's environment).
    `close()` the parent's copy once the child is started."""

    fd: int
    env: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def pass_secret(secret: bytes | None = None) -> PassedSecret:
    """A pipe holding `secret` (this process's, by default) for one child to inherit:
    written whole and closed for writing at once (SECRET_BYTES fit in any pipe buffer), so
    the child reads it to its end. The descriptor is not inheritable until listed in
    pass_fds. One PassedSecret per child."""
    secret = process_secret() if secret is None else secret
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, secret)
    finally:
        os.close(write_end)
    return PassedSecret(read_end, {SECRET_FD_ENV: str(read_end)})


def trust_scope(name: str, trust: Trust) -> bytes:
    """A digest of what a session's verdict rests on: the tunnel's name, the certificates
    of tls.ca and the CRLs (each by the SHA-256 of its DER), in order. Mixed into the
    ticket keys: a change of any of them is a change of keys."""
    digest = hashlib.sha256(name.encode() + b"\x00")
    for cert in (*trust.anchors, *trust.intermediates):
        digest.update(b"C" + hashlib.sha256(cert.public_bytes(Encoding.DER)).digest())
    for crl in trust.crls:
        digest.update(b"R" + crl.fingerprint)
    return digest.digest()


@dataclass(frozen=True)
class TicketKey:
    """One period's keys: the name written in clear at the start of each ticket (RFC 5077
    section 4's key_name), the HMAC-SHA256 key, the AES-256-CBC key."""

    period: int
    name: bytes
    hmac_key: bytes
    aes_key: bytes


class TicketKeys:
    """The keys of one scope (see the module docstring), for the current period by
    `clock` (unix seconds; time.time by default, injectable for tests)."""

    def __init__(self, secret: bytes, scope: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a ticket secret is {SECRET_BYTES} bytes, not {len(secret)}")
        self._secret = secret
        self._scope = scope
        self.clock = clock
        self._keys: dict[int, TicketKey] = {}

    def period(self) -> int:
        """The current period: floor(clock() / PERIOD)."""
        return int(self.clock() // PERIOD)

    def key(self, period: int) -> TicketKey:
        """The keys of `period` (derived once, then kept with the previous period's)."""
        key = self._keys.get(period)
        if key is None:
            okm = HKDF(
                algorithm=hashes.SHA256(),
                length=NAME_BYTES + HMAC_BYTES + AES_BYTES,
                salt=None,
                info=INFO + self._scope + period.to_bytes(8, "big", signed=True),
            ).derive(self._secret)
            key = TicketKey(period, okm[:NAME_BYTES], okm[NAME_BYTES : NAME_BYTES + HMAC_BYTES], okm[-AES_BYTES:])
            self._keys = {p: k for p, k in self._keys.items() if p >= period - 1} | {period: key}
        return key

    def encrypting(self) -> TicketKey:
        """The keys new tickets are made under: the current period's."""
        return self.key(self.period())

    def decrypting(self, name: bytes) -> tuple[TicketKey, bool] | None:
        """The keys of a ticket whose key name is `name`, and whether it should be replaced
        by one under the current keys (it is from the previous period); None if `name` is
        neither the current period's nor the previous one's."""
        now = self.period()
        for period, renew in ((now, False), (now - 1, True)):
            key = self.key(period)
            if key.name == name:
                return key, renew
        return None
