"""tunnel.openssl: finding a context's SSL_CTX, and the settings made through it."""

from __future__ import annotations

import ssl
from typing import cast

from tunnel.openssl import SSL_CTRL_GET_MAX_CERT_LIST, ctx_ctrl, set_groups, set_max_cert_list, ssl_ctx_pointer


def test_the_ssl_ctx_of_a_stdlib_context_is_found_in_both_roles() -> None:
    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        assert ssl_ctx_pointer(ctx) is not None
        assert ctx_ctrl(ctx, SSL_CTRL_GET_MAX_CERT_LIST, 0) == 100 * 1024  # OpenSSL's default


def test_two_contexts_have_two_pointers() -> None:
    a, b = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ssl_ctx_pointer(a) != ssl_ctx_pointer(b)


def test_something_that_is_not_a_stdlib_context_is_not_read() -> None:
    class Imitation:  # has the attributes, not the layout
        options = ssl.OP_ALL
        verify_mode = ssl.CERT_REQUIRED
        minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED

    fake = cast(ssl.SSLContext, Imitation())
    assert ssl_ctx_pointer(fake) is None
    assert ctx_ctrl(fake, SSL_CTRL_GET_MAX_CERT_LIST, 0) is None
    assert not set_groups(fake, "X25519")
    assert not set_max_cert_list(fake, 1000)


def test_the_max_cert_list_is_set_and_read_back() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert set_max_cert_list(ctx, 32768)
    assert ctx_ctrl(ctx, SSL_CTRL_GET_MAX_CERT_LIST, 0) == 32768
    assert not set_max_cert_list(ctx, 0)


def test_an_unknown_group_name_is_not_set() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert set_groups(ctx, "X25519:P-256:P-384")
    assert not set_groups(ctx, "X25519:no-such-group")
