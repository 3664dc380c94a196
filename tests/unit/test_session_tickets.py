"""Server-side session resumption from session tickets under shared keys
(tunnel.session_tickets, tunnel.ticket_keys), through real handshakes between
`ssl.SSLObject`s joined by memory BIOs; and the master secret's passing to a child."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PKI, make_pki, server_doc, write_yaml
from tunnel import pki
from tunnel.config import load_file
from tunnel.session_tickets import tickets_of, use_session_tickets
from tunnel.state import TunnelState
from tunnel.ticket_keys import (
    PERIOD,
    SECRET_BYTES,
    SECRET_FD_ENV,
    SecretError,
    TicketKeys,
    create_secret,
    pass_secret,
    receive_secret,
)


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
    return client


def state(p: PKI, tmp_path: Path, **tls: str) -> TunnelState:
    doc = server_doc(p, "127.0.0.1:9")
    doc["tls"].update(tls)
    return TunnelState.build(load_file(write_yaml(tmp_path / "edge.yaml", doc)))


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_session_resumes_in_another_process_that_has_the_same_secret_and_trust(
    pki_files: PKI, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """Two states built from one file stand for two workers: each its own context, its
    own PeerRecords. A session cache resumed only in the process that made it."""
    worker_a, worker_b = state(pki_files, tmp_path), state(pki_files, tmp_path)
    client_ctx = pki_files.client_context("app1")
    client_ctx.maximum_version = version
    first = connect(client_ctx, worker_a.context)
    assert not first.session_reused
    again = connect(client_ctx, worker_b.context, first.session)
    assert again.session_reused
    assert connect(client_ctx, worker_a.context, again.session).session_reused
    for worker in (worker_a, worker_b):  # nothing kept in the process: a ticket holds it all
        assert worker.context.session_stats()["number"] == 0


def test_a_session_does_not_resume_under_other_trust_settings(tmp_path: Path) -> None:
    """A ticket's keys derive from the CA certificates and CRLs: a reload that changes the
    CRL (a revocation) starts over with full handshakes, as a new session cache did."""
    p = make_pki(tmp_path / "pki")
    before = state(p, tmp_path, crl=str(p.dir / "crl.pem"))
    client_ctx = p.client_context("app1")
    session = connect(client_ctx, before.context).session
    assert connect(client_ctx, state(p, tmp_path, crl=str(p.dir / "crl.pem")).context, session).session_reused
    pki.revoke(p.dir, "app2")  # some other client's revocation: a new CRL all the same
    after = state(p, tmp_path, crl=str(p.dir / "crl.pem"))
    assert not connect(client_ctx, after.context, session).session_reused
    other_ca = make_pki(tmp_path / "other")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(p.ca.read_bytes() + other_ca.ca.read_bytes())
    assert not connect(client_ctx, state(p, tmp_path, ca=str(bundle)).context, session).session_reused


def test_a_session_does_not_resume_under_another_secret(pki_files: PKI, tmp_path: Path) -> None:
    a = state(pki_files, tmp_path)
    assert tickets_of(a.context) is not None
    client_ctx = pki_files.client_context("app1")
    session = connect(client_ctx, a.context).session
    b = pki_files.server_context()
    assert use_session_tickets(b, TicketKeys(create_secret(), b"scope"), lambda leaf: True)
    assert not connect(client_ctx, b, session).session_reused


def test_keys_rotate_every_period_and_the_previous_period_still_resumes(pki_files: PKI) -> None:
    now = [1_000 * PERIOD + 10.0]
    keys = TicketKeys(create_secret(), b"scope", clock=lambda: now[0])
    server_ctx = pki_files.server_context()
    assert use_session_tickets(server_ctx, keys, lambda leaf: True)
    client_ctx = pki_files.client_context("app1")
    made_in_n = connect(client_ctx, server_ctx).session
    now[0] += PERIOD  # n + 1: the ticket's keys are the previous period's
    renewed = connect(client_ctx, server_ctx, made_in_n)
    assert renewed.session_reused
    assert renewed.session is not None
    assert renewed.session.has_ticket
    now[0] += PERIOD  # n + 2
    assert not connect(client_ctx, server_ctx, made_in_n).session_reused  # two periods old
    assert connect(client_ctx, server_ctx, renewed.session).session_reused


def test_ticket_keys_are_the_same_for_the_same_secret_scope_and_period_only() -> None:
    secret = create_secret()
    at = [5 * PERIOD + 1.0]
    keys = TicketKeys(secret, b"a", clock=lambda: at[0])
    same = TicketKeys(secret, b"a", clock=lambda: at[0])
    assert keys.encrypting() == same.encrypting()
    assert keys.encrypting().name != TicketKeys(secret, b"b", clock=lambda: at[0]).encrypting().name
    assert keys.encrypting().name != TicketKeys(create_secret(), b"a", clock=lambda: at[0]).encrypting().name
    name_n = keys.encrypting().name
    assert keys.decrypting(name_n) == (keys.encrypting(), False)
    at[0] += PERIOD
    found = keys.decrypting(name_n)
    assert found is not None
    assert found[1]
    at[0] += PERIOD
    assert keys.decrypting(name_n) is None
    with pytest.raises(ValueError, match="32 bytes"):
        TicketKeys(b"short", b"a")


def test_a_secret_passes_to_a_child_through_an_inherited_pipe_only() -> None:
    secret = create_secret()
    passed = pass_secret(secret)
    child = (
        "import os, sys; from tunnel.ticket_keys import process_secret, SECRET_FD_ENV;"
        "s = process_secret(); env = open(f'/proc/{os.getpid()}/environ', 'rb').read();"
        "shown = s in env or s.hex().encode() in env;"
        "sys.stdout.write(f'{s.hex()} {SECRET_FD_ENV in os.environ} {shown}')"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", child],
            env={**os.environ, **passed.env},
            pass_fds=[passed.fd],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    finally:
        passed.close()
    assert out == f"{secret.hex()} False False"
    assert passed.env == {SECRET_FD_ENV: passed.env[SECRET_FD_ENV]}
    assert passed.env[SECRET_FD_ENV].isdigit()


def test_a_child_with_no_secret_passed_makes_its_own() -> None:
    assert receive_secret({}) is None
    assert len(create_secret()) == SECRET_BYTES
    assert create_secret() != create_secret()


def test_a_bad_secret_descriptor_is_a_clear_error() -> None:
    with pytest.raises(SecretError, match="not a descriptor number"):
        receive_secret({SECRET_FD_ENV: "three"})
    read_end, write_end = os.pipe()
    os.write(write_end, b"short")
    os.close(write_end)
    with pytest.raises(SecretError, match="held 5 bytes, not a 32-byte secret"):
        receive_secret({SECRET_FD_ENV: str(read_end)})
    with pytest.raises(SecretError, match="cannot read the ticket secret from descriptor"):
        receive_secret({SECRET_FD_ENV: str(read_end)})  # closed by the first attempt
