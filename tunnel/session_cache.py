"""Server-side TLS session resumption from a bounded in-memory cache, instead of
stateless session tickets.

Why: a stateless ticket carries the whole session, the client's certificate included,
encrypted. OpenSSL 3.0 serialises and encrypts it for every handshake and decrypts and
re-parses the certificate for every resumption, which made a resumed handshake cost
nearly as much as a full one (measured with `make bench`: 1.37 ms of server CPU against
0.94 ms from the cache). With a session cache the ticket is only an ID.

The cache must be bounded: each entry holds the client's parsed certificate (about 10 KiB
measured), and OpenSSL's default of 20,480 entries would be some 200 MB. Python's `ssl`
module cannot set the cache size, so `limit_session_cache` calls OpenSSL's
`SSL_CTX_ctrl` on the context through ctypes (tunnel.openssl, which says how the
`SSL_CTX *` is found and checked). It sets the size only on a context whose cache is
still at OpenSSL's default size: one set already, or not what we think it is, is left
alone. If the size cannot be set, the caller keeps stateless tickets: slower
resumption, same security.

A reload builds a new context and so an empty cache: a session never outlives the
trust settings (CA, CRL) it was established under.
"""

from __future__ import annotations

import ssl

from tunnel.openssl import ctx_ctrl

SESSION_CACHE_SIZE = 1024

_SSL_CTRL_SET_SESS_CACHE_SIZE = 42  # ssl.h (OpenSSL 3.0)
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43
_OPENSSL_DEFAULT_CACHE_SIZE = 1024 * 20  # SSL_SESSION_CACHE_MAX_SIZE_DEFAULT


def use_session_cache(ctx: ssl.SSLContext, size: int = SESSION_CACHE_SIZE) -> bool:
    """Make a server context resume sessions from a cache of at most `size` entries.
    False (and `ctx` unchanged) if the cache size cannot be set safely."""
    if not limit_session_cache(ctx, size):
        return False
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.3: tickets become cache IDs; TLS 1.2: session IDs
    return True


def limit_session_cache(ctx: ssl.SSLContext, size: int) -> bool:
    """Set the context's session cache size; False if its OpenSSL handle is not provably
    found, or its cache size is not OpenSSL's default (set already: hands off)."""
    if size < 1 or ctx_ctrl(ctx, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0) != _OPENSSL_DEFAULT_CACHE_SIZE:
        return False
    ctx_ctrl(ctx, _SSL_CTRL_SET_SESS_CACHE_SIZE, size)
    return ctx_ctrl(ctx, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0) == size
