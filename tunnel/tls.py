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


def _load_identity(ctx: ssl.SSLContext, source: Path, tls: TLSConfig) -> None:
    try:
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(source, "tls.key", f"{tls.key} does not match {tls.cert}") from None
        raise ConfigError(source, "tls.cert", f"cannot load {tls.cert} with key {tls.key}: {_reason(exc)}") from None
    except OSError as exc:
        raise ConfigError(source, "tls.cert", f"cannot read: {exc}") from None


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
