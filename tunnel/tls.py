"""Tunnel configuration → `ssl.SSLContext` for each side, with one TLS policy for all.

The policy: TLS 1.2 or 1.3 only; for TLS 1.2 only forward-secret AEAD suites (Mozilla's
"intermediate" list); no compression, no renegotiation; the tunnel's own CA as the only
trust anchor (never the system store); CRLs, when configured, enforced on every
certificate of the peer's path; key exchange over X25519, P-256 or P-384 only (GROUPS);
a peer's certificate list at most MAX_CERT_LIST bytes. What the handshake checks is
parsed again in trust.py, for the moments without a full handshake (reload, resumption,
`tunnel check`).
"""

from __future__ import annotations

import functools
import logging
import ssl
from pathlib import Path

from tunnel import postgres
from tunnel.config import ConfigError, TLSConfig, TunnelConfig
from tunnel.openssl import build_own_chain, set_groups, set_max_cert_list
from tunnel.outcomes import ssl_words
from tunnel.passwords import read_password_file

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

# The key exchange groups offered (client) and accepted (server), in order of preference.
# Not OpenSSL's default list, which also has X448, P-521 and the finite-field groups
# ffdhe2048 to ffdhe8192 (RFC 7919): one replayed ClientHello offering only ffdhe8192
# costs the server some 120 ms of CPU against 0.7 ms for X25519, on the event loop,
# with no work on the client's side. These three are what every TLS 1.3 stack offers.
GROUPS = "X25519:P-256:P-384"
# The longest certificate list a peer may send, in bytes of its Certificate message
# (SSL_CTX_set_max_cert_list(3); OpenSSL's default is 100 KiB). A real chain of a leaf and
# two intermediates is 2 to 6 KiB; a client from a foreign CA sending its leaf and 95 KB
# of junk certificates costs 22 ms to refuse against 0.5 ms. Refused from the message's
# header, before it is read: "certificate list too long" in the log.
MAX_CERT_LIST = 32 * 1024
# Where the groups cannot be set (see _limit_key_exchange): the one curve the stdlib can set.
FALLBACK_CURVE = "prime256v1"

log = logging.getLogger("tunnel")

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
    _limit_key_exchange(ctx)
    if server_side:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        # One TLS 1.3 session ticket per handshake (OpenSSL's default is two): a client
        # tunnel keeps only the latest, and each ticket costs an encryption.
        ctx.num_tickets = 1
    _load_identity(ctx, config.source, tls)
    _load_trust(ctx, config.source, tls)
    # The chain sent after tls.cert, built from tls.ca once here rather than in every
    # handshake (where that is possible; the same certificates either way).
    build_own_chain(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if config.protocol == "postgres":
        ctx.set_alpn_protocols([postgres.ALPN])  # required by PostgreSQL 17's direct TLS
    if not server_side:
        ctx.check_hostname = True
    # A server's session tickets (keys shared by every process) are set by
    # TunnelState.build, which has the trust they are tied to (tunnel/session_tickets.py).
    return ctx


def _limit_key_exchange(ctx: ssl.SSLContext) -> None:
    """GROUPS and MAX_CERT_LIST on `ctx`, through tunnel.openssl.

    Where that cannot reach the context's SSL_CTX safely (not CPython, a context layout it
    does not recognise), the context is still built, not refused: refusing would stop
    every tunnel on such a Python for what is a CPU-cost bound, not a security property.
    The groups fall back to the one curve the stdlib can set (`set_ecdh_curve`: P-256
    only, which every TLS 1.3 peer supports), which still excludes the costly groups; the
    certificate list stays at OpenSSL's 100 KiB default. A warning says so, once."""
    if set_groups(ctx, GROUPS):
        bounded = set_max_cert_list(ctx, MAX_CERT_LIST)
        shortfall = "" if bounded else f"the peer's certificate list is not bounded to {MAX_CERT_LIST} bytes"
    else:
        ctx.set_ecdh_curve(FALLBACK_CURVE)
        shortfall = (
            f"key exchange limited to {FALLBACK_CURVE} only instead of {GROUPS}, and the peer's "
            f"certificate list not bounded to {MAX_CERT_LIST} bytes"
        )
    if shortfall:
        _warn_once(shortfall)


@functools.cache
def _warn_once(shortfall: str) -> None:
    """The same for every context of the process: it depends on the Python build only."""
    log.warning("cannot reach OpenSSL's SSL_CTX from this Python's ssl module: %s", shortfall)


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
