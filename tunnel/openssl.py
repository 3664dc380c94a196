"""The few OpenSSL calls the `ssl` module does not offer, through ctypes on the libssl it links.

Python's `ssl` cannot set a context's key exchange groups (`set_ecdh_curve` takes one
curve), its session cache size or the longest certificate list it accepts. OpenSSL sets
all three with `SSL_CTX_ctrl` (ssl.h: `SSL_CTX_set1_groups_list`, `SSL_CTX_sess_set_cache_size`,
`SSL_CTX_set_max_cert_list` are macros over it), called here on the very libssl the `ssl`
module is linked to, so the `SSL_CTX` and the library always agree.

Finding a context's `SSL_CTX *` means reading the first field of CPython's context object
(`PySSLContext`: the object header, then `SSL_CTX *ctx`; so from CPython 3.7 to 3.13).
Only on CPython, only for an instance of `_ssl._SSLContext`, and only if that type is big
enough to hold the field, is the pointer read; then what OpenSSL reports for it (options,
verify mode, minimum and maximum protocol version) must match what the `ssl` module says
before anything is set. Those values are read through the pointer, so the guard against
a wrong layout is the layout check before them, not a way to survive a wrong pointer.
Whoever calls these gets False (nothing set) whenever a check fails, and decides what
that means: see `tls.build_context` and `session_tickets`.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from functools import cache

# ssl.h (OpenSSL 3.0): the SSL_CTX_ctrl commands used here.
SSL_CTRL_GET_MAX_CERT_LIST = 50
SSL_CTRL_SET_MAX_CERT_LIST = 51
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_GET_EXTRA_CHAIN_CERTS = 82
SSL_CTRL_BUILD_CERT_CHAIN = 105
SSL_CTRL_GET_CHAIN_CERTS = 115
SSL_CTRL_GET_MIN_PROTO_VERSION = 130
SSL_CTRL_GET_MAX_PROTO_VERSION = 131
# SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR | SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR (ssl.h)
_BUILD_CHAIN_AS_FAR_AS_IT_GOES = 0x8 | 0x10

_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}  # SSL_VERIFY_* bits


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The context's `SSL_CTX *` as an int, or None unless it is provably that (see the
    module docstring for the checks)."""
    lib = libssl()
    if lib is None:
        return None
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
    # The ssl module reports an unset bound (0 in OpenSSL) as MINIMUM/MAXIMUM_SUPPORTED (< 0).
    for command, version in (
        (SSL_CTRL_GET_MIN_PROTO_VERSION, ctx.minimum_version),
        (SSL_CTRL_GET_MAX_PROTO_VERSION, ctx.maximum_version),
    ):
        if lib.SSL_CTX_ctrl(handle, command, 0, None) != max(int(version), 0):
            return None
    return int(handle)


def ctx_ctrl(ctx: ssl.SSLContext, command: int, larg: int, parg: bytes | None = None) -> int | None:
    """`SSL_CTX_ctrl(ctx, command, larg, parg)` (SSL_CTX_ctrl(3)): its return value, or
    None (nothing called) if the context's `SSL_CTX *` cannot be found safely."""
    handle = ssl_ctx_pointer(ctx)
    if handle is None:
        return None
    lib = libssl()
    assert lib is not None
    return int(lib.SSL_CTX_ctrl(handle, command, larg, parg))


def set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    """Offer (client) or accept (server) only these key exchange groups, in this order of
    preference: a colon-separated list of OpenSSL group names, as `SSL_CTX_set1_groups_list`
    (SSL_CTX_set1_curves(3)) takes it, e.g. "X25519:P-256:P-384". They are the TLS 1.3
    key shares and the TLS 1.2 ECDHE curves. False if not set: the context could not be
    reached, or OpenSSL refused the list (an unknown name)."""
    return ctx_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) == 1


def set_max_cert_list(ctx: ssl.SSLContext, size: int) -> bool:
    """Refuse a peer's certificate list longer than `size` bytes, counted as the
    Certificate handshake message's length on the wire (SSL_CTX_set_max_cert_list(3);
    OpenSSL's default is 100 KiB). OpenSSL also applies it to a server's
    CertificateRequest. OpenSSL refuses a longer message from its header, before reading
    it, with EXCESSIVE_MESSAGE_SIZE. False if not set."""
    if size < 1 or ctx_ctrl(ctx, SSL_CTRL_SET_MAX_CERT_LIST, size) is None:
        return False
    return ctx_ctrl(ctx, SSL_CTRL_GET_MAX_CERT_LIST, 0) == size


def build_own_chain(ctx: ssl.SSLContext) -> bool:
    """Build the certificate chain `ctx` sends after its own certificate once, now,
    instead of in every handshake. True if built; False (nothing changed) if the context
    could not be reached, already has a chain, or OpenSSL would not build one.

    A context whose certificate file holds the leaf alone (no intermediates after it) has
    no chain of its own, so OpenSSL builds one from the context's trust store (tls.ca)
    for every Certificate message it writes: an X509_verify_cert, signature checks
    included (ssl_add_cert_chain, "auto chain"; SSL_CTX_set_mode(3),
    SSL_MODE_NO_AUTO_CHAIN). Measured here: 0.08 ms of a 0.95 ms full handshake on the
    server's side. SSL_CTX_build_cert_chain(3), with SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR,
    makes the same call on the same store once and keeps the result as the
    certificate's chain, which OpenSSL then sends as it is: the same certificates (the
    issuers found in tls.ca, its root included; as far as it got if the path does not
    verify, as each handshake's build would). A context with a chain (from the
    certificate file, or extra chain certificates) is left alone: OpenSSL sends that
    one, and a build would replace it. The context's store must be complete first: call
    it after load_verify_locations."""
    handle = ssl_ctx_pointer(ctx)
    lib = libssl()
    if handle is None or lib is None:
        return False
    for command in (SSL_CTRL_GET_CHAIN_CERTS, SSL_CTRL_GET_EXTRA_CHAIN_CERTS):
        stack = ctypes.c_void_p()
        if lib.SSL_CTX_ctrl(handle, command, 1, ctypes.byref(stack)) != 1:  # 1: extra certs only
            return False
        if stack.value and lib.OPENSSL_sk_num(stack) > 0:
            return False
    return int(lib.SSL_CTX_ctrl(handle, SSL_CTRL_BUILD_CERT_CHAIN, _BUILD_CHAIN_AS_FAR_AS_IT_GOES, None)) > 0


@cache
def libssl() -> ctypes.CDLL | None:
    """The libssl the `ssl` module uses: symbols looked up through `_ssl`'s own handle.
    None where that is not possible (no ctypes, a static or unusual build)."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        lib.OPENSSL_sk_num.restype = ctypes.c_int
        lib.OPENSSL_sk_num.argtypes = [ctypes.c_void_p]
    except (ImportError, OSError, AttributeError):
        return None
    return lib
