"""Tunnel configuration → `ssl.SSLContext` for each side, with one TLS policy for all.

The policy: TLS 1.2 or 1.3 only; for TLS 1.2 only forward-secret AEAD suites (Mozilla's
"intermediate" list); no compression, no renegotiation; the tunnel's own CA as the only
trust anchor (never the system store); a CRL enforced on the leaf when one is configured.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tunnel.config import ConfigError, TLSConfig, TunnelConfig
from tunnel.passwords import read_password_file
from tunnel.session_cache import use_session_cache
from tunnel.streams import ssl_words

# Mozilla "intermediate" TLS 1.2 suites (TLS 1.3 suites are all AEAD and always on).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def build_context(config: TunnelConfig) -> ssl.SSLContext:
    """The context for the TLS side of a tunnel: accepting (server) or dialling (client)."""
    server_side = config.mode == "server"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    tls = config.tls
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if server_side:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        # One TLS 1.3 session ticket per handshake (OpenSSL's default is two): a client
        # tunnel keeps only the latest, and each ticket costs an encryption.
        ctx.num_tickets = 1
    _load_identity(ctx, config.source, tls)
    _load_trust(ctx, config.source, tls)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        # Resume from a bounded session cache rather than stateless tickets where the
        # stdlib lets us bound it (see session_cache.py): much cheaper resumptions.
        use_session_cache(ctx)
    else:
        ctx.check_hostname = True
    return ctx


class _KeyIsEncrypted(Exception):
    """Raised from the password callback when OpenSSL asks for a password we do not have."""


def _load_identity(ctx: ssl.SSLContext, source: Path, tls: TLSConfig) -> None:
    """Load tls.cert and tls.key into *ctx*. Never prompts: OpenSSL gets a password
    callback always (without one it reads the password from /dev/tty, and waits for it),
    and the callback gives the password from tls.key_password_file or refuses. ConfigError
    naming tls.key when the key is encrypted and there is no password, or the wrong one."""
    password = key_password(source, tls)
    asked = False

    def give_password() -> bytes:
        nonlocal asked
        asked = True
        if password is None:
            raise _KeyIsEncrypted
        return password

    try:
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key), password=give_password)
    except _KeyIsEncrypted:
        raise ConfigError(source, "tls.key", f"{tls.key}: the key is encrypted: set tls.key_password_file") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(source, "tls.key", f"{tls.key} does not match {tls.cert}") from None
        if asked:  # the certificate loaded (it comes first) and the key would not decrypt
            raise ConfigError(
                source, "tls.key", f"cannot decrypt {tls.key}: wrong password (tls.key_password_file)"
            ) from None
        raise ConfigError(source, "tls.cert", f"cannot load {tls.cert} with key {tls.key}: {_reason(exc)}") from None
    except ValueError as exc:  # CPython: "password cannot be longer than N bytes"
        raise ConfigError(source, "tls.key_password_file", str(exc)) from None
    except OSError as exc:
        raise ConfigError(source, "tls.cert", f"cannot read: {exc}") from None


def key_password(source: Path, tls: TLSConfig) -> bytes | None:
    """The password in tls.key_password_file (see passwords.read_password_file), or None
    when there is none. ConfigError naming tls.key_password_file if it is empty or unreadable."""
    if tls.key_password_file is None:
        return None
    try:
        return read_password_file(tls.key_password_file)
    except ValueError as exc:
        raise ConfigError(source, "tls.key_password_file", str(exc)) from None
    except OSError as exc:
        raise ConfigError(
            source, "tls.key_password_file", f"cannot read {tls.key_password_file}: {exc.strerror or exc}"
        ) from None


def _load_trust(ctx: ssl.SSLContext, source: Path, tls: TLSConfig) -> None:
    try:
        ctx.load_verify_locations(cafile=str(tls.ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(source, "tls.ca", f"no CA certificate in {tls.ca}: {_reason(exc)}") from None
    if tls.crl is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.crl))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(source, "tls.crl", f"cannot load {tls.crl}: {_reason(exc)}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def _reason(exc: BaseException) -> str:
    return ssl_words(exc) if isinstance(exc, ssl.SSLError) else str(exc)


@dataclass(frozen=True)
class Certificates:
    """A tunnel's own certificate and the certificates of its CA file, parsed once."""

    cert: x509.Certificate
    cas: tuple[x509.Certificate, ...]

    def expiries(self, tls: TLSConfig) -> list[tuple[Path, datetime]]:
        """(file, not-after) for the certificate and the CA file (its earliest expiry)."""
        return [
            (tls.cert, self.cert.not_valid_after_utc),
            (tls.ca, min(ca.not_valid_after_utc for ca in self.cas)),
        ]


def load_certificates(config: TunnelConfig) -> Certificates:
    """Parse tls.cert and tls.ca (ConfigError naming the key if either is not PEM)."""
    tls = config.tls
    cert = _load_certificates(config.source, "tls.cert", tls.cert)[0]
    return Certificates(cert, tuple(_load_certificates(config.source, "tls.ca", tls.ca)))


def check_certificates(
    config: TunnelConfig, *, now: datetime | None = None, certificates: Certificates | None = None
) -> list[str]:
    """What `tunnel check` adds to building the context: the certificate chains to the
    tunnel's CA and is in date. ConfigError when it does not; warnings when it expires
    within EXPIRY_WARNING. Reads the files unless given them parsed."""
    now = now or datetime.now(UTC)
    tls = config.tls
    parsed = certificates or load_certificates(config)
    cert, cas = parsed.cert, parsed.cas
    if not any(_issued_by(cert, ca) for ca in cas):
        raise ConfigError(config.source, "tls.cert", f"{tls.cert} is not signed by the CA in {tls.ca}")
    warnings = []
    for key, path, certificate in [("tls.cert", tls.cert, cert)] + [("tls.ca", tls.ca, c) for c in cas]:
        if certificate.not_valid_after_utc <= now:
            raise ConfigError(config.source, key, f"{path} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
        if certificate.not_valid_before_utc > now:
            raise ConfigError(
                config.source, key, f"{path} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d}"
            )
        left = certificate.not_valid_after_utc - now
        if left < EXPIRY_WARNING:
            warnings.append(
                f"{config.source}: {key}: {path} expires in {left.days} days "
                f"({certificate.not_valid_after_utc:%Y-%m-%d})"
            )
    return warnings


EXPIRY_WARNING = timedelta(days=30)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_certificates(source: Path, key: str, path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise ConfigError(source, key, f"no PEM certificate in {path}: {exc}") from None
    return certs


@dataclass(frozen=True)
class Trust:
    """The parsed trust material of a tunnel, kept to re-check open connections on reload."""

    ca_certs: tuple[x509.Certificate, ...]
    revoked: frozenset[int]  # serial numbers in tls.crl
    crl_next_update: datetime | None


def load_trust(
    config: TunnelConfig, *, now: datetime | None = None, cas: tuple[x509.Certificate, ...] | None = None
) -> Trust:
    """Parse tls.ca (unless given it parsed) and tls.crl. A CRL that does not parse, is not
    signed by the CA, or is past its next update is a ConfigError: never a silent allow."""
    now = now or datetime.now(UTC)
    tls = config.tls
    if cas is None:
        cas = tuple(_load_certificates(config.source, "tls.ca", tls.ca))
    if tls.crl is None:
        return Trust(ca_certs=cas, revoked=frozenset(), crl_next_update=None)
    try:
        data = tls.crl.read_bytes()
        crl = x509.load_pem_x509_crl(data)  # PEM only: OpenSSL's file lookup reads no DER CRL
    except (ValueError, OSError) as exc:
        raise ConfigError(config.source, "tls.crl", f"no PEM CRL in {tls.crl}: {exc}") from None
    if not any(_crl_signed_by(crl, ca) for ca in cas):
        raise ConfigError(config.source, "tls.crl", f"{tls.crl} is not signed by the CA in {tls.ca}")
    next_update = crl.next_update_utc
    if next_update is None:
        raise ConfigError(config.source, "tls.crl", f"{tls.crl} has no next update time")
    if next_update <= now:
        raise ConfigError(
            config.source,
            "tls.crl",
            f"{tls.crl} is out of date: its next update was due {next_update:%Y-%m-%d %H:%M} UTC "
            "(refresh it with tunnel ca crl)",
        )
    return Trust(
        ca_certs=cas,
        revoked=frozenset(entry.serial_number for entry in crl),
        crl_next_update=next_update,
    )


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if crl.issuer != ca.subject:
        return False
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def chains_to(cert_der: bytes, trust: Trust) -> bool:
    """Whether a peer's leaf certificate was issued by one of the tunnel's CA certificates."""
    cert = x509.load_der_x509_certificate(cert_der)
    return any(_issued_by(cert, ca) for ca in trust.ca_certs)
