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
`SSL_CTX_ctrl` on the context through ctypes, from the very libssl the `ssl` module is
linked to. Finding the `SSL_CTX *` means reading the first field of CPython's context
object (`PySSLContext`: the header, then `SSL_CTX *ctx`; so from CPython 3.7 to 3.13).
Only on CPython, only for an instance of `_ssl._SSLContext` itself, and only if that type
is big enough to hold the field, is the pointer read; then three values OpenSSL reports
for it must match what the `ssl` module says (options, verify mode, and the cache size
a fresh context starts with) before the size is set. Those three are read through the
pointer, so the guard is the layout check before them, not a way to survive a wrong
pointer. If any check fails the cache size is left alone and the caller keeps stateless
tickets: slower resumption, same security.

A reload builds a new context and so an empty cache: a session never outlives the
trust settings (CA, CRL) it was established under.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from functools import cache

SESSION_CACHE_SIZE = 1024

_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43
_OPENSSL_DEFAULT_CACHE_SIZE = 1024 * 20
_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}  # SSL_VERIFY_* bits


def use_session_cache(ctx: ssl.SSLContext, size: int = SESSION_CACHE_SIZE) -> bool:
    """Make a server context resume sessions from a cache of at most `size` entries.
    False (and `ctx` unchanged) if the cache size cannot be set safely."""
    if not limit_session_cache(ctx, size):
        return False
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.3: tickets become cache IDs; TLS 1.2: session IDs
    return True


def limit_session_cache(ctx: ssl.SSLContext, size: int) -> bool:
    """Set the context's session cache size; False if its OpenSSL handle is not provably found."""
    lib = _libssl()
    if lib is None or size < 1:
        return False
    handle = _ssl_ctx_pointer(ctx, lib)
    if handle is None:
        return False
    lib.SSL_CTX_ctrl(handle, _SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    return bool(lib.SSL_CTX_ctrl(handle, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) == size)


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int | None:
    """The context's `SSL_CTX *`: the first field after the object header, if it checks out."""
    import _ssl

    base = _ssl._SSLContext
    if sys.implementation.name != "cpython" or not isinstance(ctx, base):
        return None
    if base.__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        return None
    handle = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not handle:
        return None
    if lib.SSL_CTX_get_options(handle) != int(ctx.options):
        return None
    if lib.SSL_CTX_get_verify_mode(handle) != _VERIFY_MODES.get(ctx.verify_mode):
        return None
    if lib.SSL_CTX_ctrl(handle, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) != _OPENSSL_DEFAULT_CACHE_SIZE:
        return None  # set already, or not what we think it is: leave it alone
    return int(handle)


@cache
def _libssl() -> ctypes.CDLL | None:
    """The libssl the `ssl` module uses: symbols looked up through `_ssl`'s own handle."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    except (ImportError, OSError, AttributeError):
        return None
    return lib
