"""Server-side session resumption from a bounded cache (tunnel.session_cache), through real
handshakes between `ssl.SSLObject`s joined by memory BIOs."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import cast

import pytest

from tests.helpers import PKI, server_doc, write_yaml
from tunnel.config import load_file
from tunnel.session_cache import SESSION_CACHE_SIZE, limit_session_cache, use_session_cache
from tunnel.tls import build_context


def connect(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> ssl.SSLObject:
    """A completed handshake; returns the client side, its session ticket already read."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {id(client): False, id(server): False}
    for _ in range(20):
        for obj in (client, server):
            if not done[id(obj)]:
                try:
                    obj.do_handshake()
                    done[id(obj)] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()) and not c_out.pending and not s_out.pending:
            break
    assert all(done.values()), "the handshake did not complete"
    with pytest.raises(ssl.SSLWantReadError):
        client.read(1)  # takes in the TLS 1.3 NewSessionTicket
    # A clean close, as the tunnel makes: OpenSSL drops the session of a connection
    # freed without a close_notify from its cache.
    with pytest.raises(ssl.SSLWantReadError):
        server.unwrap()
    return client


def test_a_server_tunnel_context_resumes_from_its_session_cache(pki_files: PKI, tmp_path: Path) -> None:
    server_ctx = build_context(load_file(write_yaml(tmp_path / "s.yaml", server_doc(pki_files, "127.0.0.1:9"))))
    assert server_ctx.options & ssl.OP_NO_TICKET  # stateful: the ticket is only a cache ID
    client_ctx = pki_files.client_context("app1")
    first = connect(client_ctx, server_ctx)
    assert not first.session_reused
    again = connect(client_ctx, server_ctx, first.session)
    assert again.session_reused
    assert server_ctx.session_stats()["hits"] == 1
    # The cache is bounded at SESSION_CACHE_SIZE: no room to set it again.
    assert not limit_session_cache(server_ctx, SESSION_CACHE_SIZE + 1)


def test_the_cache_keeps_at_most_its_size_and_the_newest_sessions(pki_files: PKI) -> None:
    server_ctx = pki_files.server_context()
    assert use_session_cache(server_ctx, 3)
    client_ctx = pki_files.client_context("app1")
    sessions = [connect(client_ctx, server_ctx).session for _ in range(6)]
    stats = server_ctx.session_stats()
    assert 1 <= stats["number"] <= 3
    assert stats["cache_full"] >= 3
    assert connect(client_ctx, server_ctx, sessions[-1]).session_reused
    assert not connect(client_ctx, server_ctx, sessions[0]).session_reused  # evicted


def test_without_a_bounded_cache_the_context_keeps_stateless_tickets(pki_files: PKI) -> None:
    server_ctx = pki_files.server_context()
    assert limit_session_cache(server_ctx, 5)
    # Set once already: the handle no longer looks like a fresh context's, so hands off.
    assert not use_session_cache(server_ctx, 7)
    assert not server_ctx.options & ssl.OP_NO_TICKET
    client_ctx = pki_files.client_context("app1")
    first = connect(client_ctx, server_ctx)
    assert connect(client_ctx, server_ctx, first.session).session_reused  # a stateless ticket
    assert server_ctx.session_stats()["number"] == 0


@pytest.mark.parametrize("size", [0, -1])
def test_a_cache_size_below_one_is_not_set(pki_files: PKI, size: int) -> None:
    server_ctx = pki_files.server_context()
    assert not use_session_cache(server_ctx, size)
    assert not server_ctx.options & ssl.OP_NO_TICKET


def test_something_that_is_not_a_stdlib_context_is_left_alone() -> None:
    class Imitation:  # has the attributes, not the layout
        options = ssl.OP_ALL
        verify_mode = ssl.CERT_REQUIRED

    assert not use_session_cache(cast(ssl.SSLContext, Imitation()), 3)
