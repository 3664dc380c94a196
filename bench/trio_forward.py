"""The event loop's floor: a bare plain-TCP forwarder on trio, written like the tunnel's
relay (non-blocking sockets, trio's wait_readable/wait_writable) but with nothing else:
no TLS, no logging, no limits, no idle timeout. A pair of these in place of a tunnel pair
shows what trio alone costs per relayed message.

With --tls-client or --tls-server (CERT KEY CA) the side towards the other forwarder is
mutual TLS, through the stdlib's SSLObject over memory BIOs as the tunnel's streams do,
and still nothing else: a pair of these is the floor of a TLS tunnel on trio, what trio
plus OpenSSL cost per relayed message ("trio-tls-floor").

    python bench/trio_forward.py LISTEN_PORT TARGET_PORT [--tls-client|--tls-server CERT KEY CA]
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys

import trio


async def pump(src: socket.socket, dst: socket.socket) -> None:
    drained = False
    while True:
        if drained:  # a short read emptied the socket: wait before reading (as the tunnel does)
            await trio.lowlevel.wait_readable(src)
        try:
            data = src.recv(262144)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        except OSError:
            break
        if not data:
            break
        drained = len(data) < 262144
        view = memoryview(data)
        while view:
            try:
                view = view[dst.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst)
            except OSError:
                return
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class TLS:
    """One TLS connection over a non-blocking socket, through memory BIOs."""

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self.sock, self.obj, self.incoming, self.outgoing = sock, obj, incoming, outgoing
        self.drained = False

    async def flush(self) -> None:
        while self.outgoing.pending:
            await send_all(self.sock, self.outgoing.read())

    async def fill(self) -> bool:
        if self.drained:  # as pump does
            await trio.lowlevel.wait_readable(self.sock)
        while True:
            try:
                data = self.sock.recv(262144)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            if not data:
                return False
            self.drained = len(data) < 262144
            self.incoming.write(data)
            return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                await self.flush()
                return
            except ssl.SSLWantReadError:
                await self.flush()
                if not await self.fill():
                    raise OSError("closed in the handshake") from None


async def send_all(dst: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[dst.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(dst)


async def pump_from_tls(src: TLS, dst: socket.socket) -> None:
    """Decrypt what comes from the other forwarder, send it on in plaintext."""
    with contextlib.suppress(OSError, ssl.SSLError):
        while True:  # records may have come with the handshake's last flight: read first
            try:
                data = src.obj.read(262144)
            except ssl.SSLWantReadError:
                if not await src.fill():
                    break
                continue
            if not data:
                break
            await send_all(dst, data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def pump_to_tls(src: socket.socket, dst: TLS) -> None:
    """Encrypt what comes in plaintext, send it to the other forwarder."""
    drained = False
    with contextlib.suppress(OSError, ssl.SSLError):
        while True:
            if drained:  # as pump does
                await trio.lowlevel.wait_readable(src)
            try:
                data = src.recv(262144)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                continue
            if not data:
                break
            drained = len(data) < 262144
            dst.obj.write(data)
            await dst.flush()
    with contextlib.suppress(OSError):
        dst.sock.shutdown(socket.SHUT_WR)


async def handle(client: socket.socket, target_port: int, tls: tuple[str, ssl.SSLContext] | None = None) -> None:
    target = socket.socket()
    target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    target.setblocking(False)
    try:
        try:
            target.connect(("127.0.0.1", target_port))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(target)
        async with trio.open_nursery() as nursery:
            if tls is None:
                nursery.start_soon(pump, target, client)
                await pump(client, target)
                return
            side, context = tls
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            if side == "--tls-server":  # the client side is TLS
                wrapped = TLS(client, context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)
                await wrapped.handshake()
                nursery.start_soon(pump_to_tls, target, wrapped)
                await pump_from_tls(wrapped, target)
            else:  # the target side is TLS
                obj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
                wrapped = TLS(target, obj, incoming, outgoing)
                await wrapped.handshake()
                nursery.start_soon(pump_from_tls, wrapped, client)
                await pump_to_tls(client, wrapped)
    except Exception:  # a probe, a failed handshake, a reset: this connection only
        pass
    finally:
        for sock in (client, target):
            trio.lowlevel.notify_closing(sock)
            sock.close()


def tls_context(side: str, cert: str, key: str, ca: str) -> ssl.SSLContext:
    server = side == "--tls-server"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def main(listen_port: int, target_port: int, tls: tuple[str, ssl.SSLContext] | None = None) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(1024)
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(handle, client, target_port, tls)


if __name__ == "__main__":
    side = sys.argv[3] if len(sys.argv) > 3 else None
    tls = None if side is None else (side, tls_context(side, *sys.argv[4:7]))
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]), tls)
