"""Tunnel configuration → `ssl.SSLContext` for each side, with one TLS policy for all.

The policy: TLS 1.2 or 1.3 only; for TLS 1.2 only forward-secret AEAD suites (Mozilla's
"intermediate" list); no compression, no renegotiation; the tunnel's own CA as the only
trust anchor (never the system store); CRLs, when configured, enforced on every
certificate of the peer's path. What the handshake checks is parsed again in trust.py,
for the moments without a full handshake (reload, resumption, `tunnel check`).
"""

from __future__ import annotations

import ssl
from pathlib import Path

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
    for crl in tls.crl:
        try:
            ctx.load_verify_locations(cafile=str(crl))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(source, "tls.crl", f"cannot load {crl}: {_reason(exc)}") from None
    if tls.crl:
        # Every certificate of the peer's path, not only the leaf (X509_V_FLAG_CRL_CHECK_ALL,
        # as stunnel and HAProxy set it): a revoked intermediate refuses all under it.
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def _reason(exc: BaseException) -> str:
    return ssl_words(exc) if isinstance(exc, ssl.SSLError) else str(exc)
