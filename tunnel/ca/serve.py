"""`tunnel ca serve`: the EST service (est.py) over HTTPS on trio.

One request per connection (tunnel.http.serve_one: 64 KiB bodies, request and response
deadlines). TLS per tunnel.tls's policy (TLS 1.2+, its suites and groups), the server
certificate NAME.crt/NAME.key from the CA directory (issued on first start if missing, for
the listen host), and client certificates requested but optional (CERT_OPTIONAL):
simpleenroll authenticates by token, simplereenroll by the certificate. A certificate a
client does send must chain to the CA's anchor and be in its validity period, or the
handshake fails (logged); whichever EKU it has (a server's certificate renews too).
At most MAX_CONNECTIONS connections are served at once; further ones wait in the
listen backlog until one ends, each within HANDSHAKE_TIMEOUT + the HTTP deadlines.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import trio
from cryptography import x509

from tunnel import http, pki
from tunnel.ca import est
from tunnel.openssl import libssl, ssl_ctx_pointer
from tunnel.tls import TLS12_CIPHERS, _limit_key_exchange

MAX_CONNECTIONS = 16
HANDSHAKE_TIMEOUT = 5.0  # seconds a client has to complete the TLS handshake
CLOSE_TIMEOUT = 1.0  # seconds to send close_notify before the socket is closed anyway
X509_PURPOSE_ANY = 7  # openssl/x509v3.h

log = logging.getLogger("tunnel")


def server_identity(directory: Path, name: str, host: str) -> tuple[Path, Path]:
    """(NAME.crt, NAME.key) in the CA directory; issued now as a server certificate with
    `host` as its SAN (an IP address or DNS name; "localhost" for a wildcard address) if
    either file is missing. Errors: pki.PKIError."""
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    if crt.exists() and key.exists():
        return crt, key
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return pki.issue(directory, name, kind="server", dns=[host], force=True)
    if address.is_unspecified:
        return pki.issue(directory, name, kind="server", dns=["localhost"], force=True)
    return pki.issue(directory, name, kind="server", ips=[str(address)], force=True)


def build_context(crt: Path, key: Path, anchor: Path) -> ssl.SSLContext:
    """The server context: tunnel.tls's policy, `crt`/`key` as identity, client
    certificates optional and verified against `anchor` alone."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _limit_key_exchange(ctx)
    ctx.load_cert_chain(crt, key)
    ctx.load_verify_locations(cafile=anchor)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    _accept_any_purpose(ctx)
    return ctx


def _accept_any_purpose(ctx: ssl.SSLContext) -> None:
    """Let a certificate with only the serverAuth EKU authenticate a client here (OpenSSL
    checks the sslclient purpose by default): servers renew their certificates too."""
    handle, lib = ssl_ctx_pointer(ctx), libssl()
    if handle is None or lib is None:
        log.warning("cannot reach OpenSSL's SSL_CTX: server certificates cannot renew over EST")
        return
    lib.SSL_CTX_set_purpose.restype = ctypes.c_int
    lib.SSL_CTX_set_purpose.argtypes = [ctypes.c_void_p, ctypes.c_int]
    if lib.SSL_CTX_set_purpose(handle, X509_PURPOSE_ANY) != 1:
        log.warning("SSL_CTX_set_purpose failed: server certificates cannot renew over EST")


async def serve(
    directory: Path,
    host: str,
    port: int,
    *,
    cert_name: str = "est",
    listening: Callable[[str], None] = lambda address: None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the CA in `directory` on HOST:PORT until cancelled; tell `listening` (and
    task_status) each bound address as HOST:PORT. Errors: pki.PKIError (not a CA, bad
    certificate name), OSError (cannot bind)."""
    authority = est.Authority.load(directory)
    crt, key = server_identity(directory, cert_name, host)
    anchor = directory / (pki.ROOT_CRT if (directory / pki.ROOT_CRT).exists() else pki.CA_CRT)
    ctx = build_context(crt, key, anchor)
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    addresses = []
    for listener in listeners:
        sockname = listener.socket.getsockname()
        addresses.append(f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0] else f"{sockname[0]}:{sockname[1]}")
    limiter = trio.Semaphore(MAX_CONNECTIONS)
    log.info(
        "est serving %s on %s (anchor sha256 %s)", directory, ", ".join(addresses), pki.fingerprint(authority.anchor)
    )
    for address in addresses:
        listening(address)
    task_status.started(addresses)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept, listener, limiter, ctx, authority, nursery)
    finally:  # cancelled (in-process use): the listening sockets are closed, not left to the GC
        for listener in listeners:
            listener.socket.close()


async def _accept(
    listener: trio.SocketListener,
    limiter: trio.Semaphore,
    ctx: ssl.SSLContext,
    authority: est.Authority,
    nursery: trio.Nursery,
) -> None:
    while True:
        await limiter.acquire()  # past MAX_CONNECTIONS, new connections wait in the backlog
        try:
            stream = await listener.accept()
        except OSError as exc:
            limiter.release()
            log.warning("est accept failed: %s", exc)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(_connection, stream, limiter, ctx, authority)


async def _connection(
    tcp: trio.SocketStream, limiter: trio.Semaphore, ctx: ssl.SSLContext, authority: est.Authority
) -> None:
    try:
        peer_name = tcp.socket.getpeername()
        address = f"{peer_name[0]}:{peer_name[1]}"
    except OSError:
        address = "?"
    stream = trio.SSLStream(tcp, ctx, server_side=True)
    try:
        await _exchange(stream, address, authority)
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()
        await trio.aclose_forcefully(tcp)
        limiter.release()


async def _exchange(stream: trio.SSLStream[trio.SocketStream], address: str, authority: est.Authority) -> None:
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
    except trio.TooSlowError:
        log.info("est %s: no TLS handshake within %ss", address, HANDSHAKE_TIMEOUT)
        return
    except trio.BrokenResourceError as exc:
        reason = exc.__cause__ if exc.__cause__ is not None else exc
        log.info("est %s: TLS handshake refused: %s", address, reason)
        return
    der = stream.getpeercert(binary_form=True)
    peer = x509.load_der_x509_certificate(der) if der else None

    async def handler(request: http.Request) -> http.Response:
        handled.append(True)
        answer = est.handle(request, authority, peer=peer, address=address)
        log.info("%s", answer.log)
        return answer.response

    heard: list[bool] = []
    handled: list[bool] = []
    try:
        await http.serve_one(stream, handler, methods=("GET", "HEAD", "POST"), received=lambda: heard.append(True))
        if not heard:
            log.info("est %s: no whole request within %ss (or none at all)", address, http.REQUEST_TIMEOUT)
        elif not handled:
            log.info("est %s: refused by the HTTP layer (malformed, over %d bytes, or method)", address, http.MAX_BODY)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.info("est %s: connection lost: %s", address, exc.__cause__ or exc)
    except Exception:
        log.exception("est %s: internal error", address)
