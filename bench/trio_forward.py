"""The event loop's floor: a bare plain-TCP forwarder on trio, written like the tunnel's
relay (non-blocking sockets, trio's wait_readable/wait_writable) but with nothing else:
no TLS, no logging, no limits, no idle timeout. A pair of these in place of a tunnel pair
shows what trio alone costs per relayed message.

    python bench/trio_forward.py LISTEN_PORT TARGET_PORT
"""

from __future__ import annotations

import contextlib
import socket
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


async def handle(client: socket.socket, target_port: int) -> None:
    target = socket.socket()
    target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    target.setblocking(False)
    try:
        try:
            target.connect(("127.0.0.1", target_port))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(target)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, target, client)
            await pump(client, target)
    finally:
        for sock in (client, target):
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def main(listen_port: int, target_port: int) -> None:
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
            nursery.start_soon(handle, client, target_port)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]))
