"""Python's floor without trio: a bare plain-TCP forwarder on one `select.epoll` loop, in
plain CPython (no event-loop library, no coroutines). Beside `trio_forward.py` in the bench's
reference table, so a reader sees that the per-message floor is CPython's and the system
calls', not trio's (issue 18: the two were within about 10% of each other).

    python bench/epoll_forward.py LISTEN_PORT TARGET_PORT

Level-triggered epoll; each readable socket is read once (up to 256 KiB) and what it gave
is written to its peer, any rest kept and the peer watched for writability until it is
sent (a reader is not read again while its peer has bytes pending). EOF is passed on as a
half-close; a connection pair ends when both directions have.
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys

READ_SIZE = 262144


class Side:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peer: Side | None = None
        self.pending = b""  # bytes read from the peer, not yet written to this socket
        self.read_done = False  # this socket sent EOF (passed on to the peer)
        self.write_done = False  # the peer's EOF passed on to this socket


def main(listen_port: int, target_port: int) -> None:
    server = socket.create_server(("127.0.0.1", listen_port), backlog=1024)
    server.setblocking(False)
    ep = select.epoll()
    ep.register(server.fileno(), select.EPOLLIN)
    sides: dict[int, Side] = {}

    def watch(side: Side) -> None:
        """Readable unless its peer still has bytes to take; writable while it has some."""
        mask = 0
        if side.peer is not None and not side.read_done and not side.peer.pending:
            mask |= select.EPOLLIN
        if side.pending:
            mask |= select.EPOLLOUT
        ep.modify(side.sock.fileno(), mask)

    def close_pair(side: Side) -> None:
        for each in (side, side.peer):
            if each is not None and each.sock.fileno() in sides:
                del sides[each.sock.fileno()]
                ep.unregister(each.sock.fileno())
                each.sock.close()

    def flush(side: Side) -> bool:
        """Write side.pending; False if the connection broke."""
        try:
            sent = side.sock.send(side.pending)
        except BlockingIOError:
            return True
        except OSError:
            return False
        side.pending = side.pending[sent:]
        if not side.pending and side.peer is not None and side.peer.read_done and not side.write_done:
            side.write_done = True
            with contextlib.suppress(OSError):
                side.sock.shutdown(socket.SHUT_WR)
        return True

    while True:
        for fd, events in ep.poll():
            if fd == server.fileno():
                with contextlib.suppress(BlockingIOError):
                    client, _ = server.accept()
                    target = socket.create_connection(("127.0.0.1", target_port))
                    for sock in (client, target):
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    a, b = Side(client), Side(target)
                    a.peer, b.peer = b, a
                    for side in (a, b):
                        sides[side.sock.fileno()] = side
                        ep.register(side.sock.fileno(), select.EPOLLIN)
                continue
            side = sides.get(fd)
            if side is None or side.peer is None:
                continue
            peer = side.peer
            if events & select.EPOLLOUT and side.pending and not flush(side):
                close_pair(side)
                continue
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not side.read_done:
                try:
                    data = side.sock.recv(READ_SIZE)
                except BlockingIOError:
                    data = None
                except OSError:
                    close_pair(side)
                    continue
                if data == b"":
                    side.read_done = True
                    if not peer.pending:
                        peer.write_done = True
                        with contextlib.suppress(OSError):
                            peer.sock.shutdown(socket.SHUT_WR)
                elif data:
                    peer.pending = data
                    if not flush(peer):
                        close_pair(side)
                        continue
            if side.read_done and peer.read_done and not side.pending and not peer.pending:
                close_pair(side)
                continue
            watch(side)
            watch(peer)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
