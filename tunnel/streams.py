"""The two kinds of byte stream a tunnel relays between: plain sockets and TLS, both
half-closeable, both driven by trio over non-blocking stdlib sockets.

Theory of operation
-------------------
`trio.SSLStream` cannot half-close (it has no `send_eof`), and its reads hand back one
16 KiB TLS record per trip through the event loop. This module drives OpenSSL through a
pair of `ssl.MemoryBIO`s over a plain non-blocking socket instead:

* Receiving: one `recv` of up to 256 KiB of ciphertext goes into the incoming BIO, then
  `SSLObject.read` is called until OpenSSL wants more, so one call returns every byte that
  is already decryptable (many records), and the relay writes them out in one go.
* Sending: `SSLObject.write` encrypts the whole chunk into the outgoing BIO (it never
  blocks), and the ciphertext is written to the socket. Only one task writes to the
  socket at a time (a reading task may need to, for a TLS 1.3 KeyUpdate reply), so the
  records leave in the order OpenSSL produced them.
* Half-close: `send_eof` sends a TLS close_notify while the other direction keeps
  flowing. The stdlib only offers `unwrap()`, which calls `SSL_shutdown` twice; the
  second call tries to read the peer's close_notify and would consume application data
  if any complete record were waiting. So before unwrapping, every complete record in
  the incoming BIO is decrypted into an overflow buffer that the next receive returns
  first; with the BIO empty, the second `SSL_shutdown` can only report "want read".
  Reading keeps working after our close_notify (OpenSSL only forbids further writes).
* EOF: a close_notify from the peer is a clean EOF; a TCP close without one is an EOF
  too, flagged `unclean_eof` so the log can say so. A reset is `StreamBroken`.

Plain sockets are the same shape: `receive_some` (b"" is EOF), `send_all`, `send_eof`
(shutdown SHUT_WR), `close`. Each stream checkpoints at least every few operations, so a
fast peer cannot starve the other tasks.

No copies on the relay's path: `receive_view` returns a view of a process-wide scratch
buffer, valid until the caller next yields to trio, and `send_all` consumes it before it
first yields (TLS encrypts it at once; a plain socket copies only what the kernel did not
take before waiting to send the rest).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import struct
from typing import Protocol

import trio

from tunnel.outcomes import ssl_reason

RECEIVE_SIZE = 256 * 1024
_CHECKPOINT_EVERY = 8
# Scratch buffers: filled and copied out with no await in between, so one per process.
_CIPHER_SCRATCH = bytearray(RECEIVE_SIZE)
_CIPHER_VIEW = memoryview(_CIPHER_SCRATCH)
_PLAIN_SCRATCH = bytearray(RECEIVE_SIZE)
_PLAIN_VIEW = memoryview(_PLAIN_SCRATCH)

# The scratch rule ("a view is valid until the caller next yields") checked, as trio's
# ConflictDetector checks its own: with TUNNEL_CHECK_SCRATCH=1 (the test suite sets it)
# sending a view of the scratch buffer that a later receive_view has overwritten raises
# ScratchMisuse instead of relaying someone else's bytes. Off, it costs one test per send.
_CHECK_SCRATCH = os.environ.get("TUNNEL_CHECK_SCRATCH") == "1"
_handed_out: memoryview | None = None  # the scratch view handed out last (when checking)


class ScratchMisuse(RuntimeError):
    """A view of the scratch buffer was used after a later receive overwrote it: a
    caller kept it across a yield (a bug in this program, never the peer's doing)."""


def _lend(view: memoryview) -> memoryview:
    """Hand out a view of the scratch buffer (and remember it, when checking)."""
    global _handed_out
    if _CHECK_SCRATCH:
        _handed_out = view
    return view


def _check_scratch(data: bytes | bytearray | memoryview) -> None:
    if isinstance(data, memoryview) and data.obj is _PLAIN_SCRATCH and data is not _handed_out:
        raise ScratchMisuse("a receive_view result was sent after a later receive_view overwrote it")


class StreamBroken(Exception):
    """The peer or the network broke the stream (reset, TLS error). Carries the cause."""


class _SocketIO:
    """Non-blocking socket I/O with trio waits; the base of both stream kinds."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()  # trio takes the number as it is; a socket costs it a lookup
        self._closed = False
        self._ready_streak = 0
        self._drained = False  # the last read emptied the kernel buffer: wait before reading
        self._send_cut = False  # a send stopped part-way (cancelled): the peer has a torn message

    async def _recv_into(self, view: memoryview) -> int:
        # Checkpoint before reading, never between the read and the caller's copy: the
        # view may be a process-wide scratch buffer.
        # After a short read the next one would almost surely fail with EAGAIN, so wait
        # for readiness first and save a system call and an exception per message.
        if self._drained:
            self._ready_streak = 0
            await trio.lowlevel.wait_readable(self._fd)
        else:
            self._ready_streak += 1
            if self._ready_streak >= _CHECKPOINT_EVERY:
                self._ready_streak = 0
                await trio.lowlevel.checkpoint()
        while True:
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                self._ready_streak = 0
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                raise StreamBroken(_os_reason(exc)) from exc
            self._drained = 0 < n < len(view)
            return n

    async def _send_raw(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data`. It may be a view of a scratch buffer: whatever the kernel
        does not take at once is copied before waiting, so the caller's buffer is free
        again as soon as this first yields."""
        if _CHECK_SCRATCH:
            _check_scratch(data)
        if data:
            try:
                sent = self.sock.send(data)  # almost always all of it
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise StreamBroken(_os_reason(exc)) from exc
            if sent < len(data):
                await self._send_rest(data, sent)
        self._ready_streak += 1
        if self._ready_streak >= _CHECKPOINT_EVERY:
            self._ready_streak = 0
            await trio.lowlevel.checkpoint()

    async def _send_rest(self, data: bytes | bytearray | memoryview, sent: int) -> None:
        # Copy what is left before the first wait, unless nobody can change it.
        rest = memoryview(data)[sent:]
        view = rest if isinstance(data, bytes) else memoryview(bytes(rest))
        self._send_cut = True  # until the rest is out
        while view:
            try:
                view = view[self.sock.send(view) :]
            except BlockingIOError:
                self._ready_streak = 0
                await trio.lowlevel.wait_writable(self._fd)
            except OSError as exc:
                raise StreamBroken(_os_reason(exc)) from exc
        self._send_cut = False

    def close(self) -> None:
        """Close at once (idempotent)."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def send_eof(self) -> None:
        raise NotImplementedError  # each stream kind ends its own way

    async def end(self) -> None:
        """End cleanly, then close: a TCP FIN, after a TLS close_notify on a TLS stream
        (each unless already sent; see `send_eof`). For an end the daemon decides on that
        is no error (an idle timeout): the peer reads a normal end of stream.

        Resets instead (`abort`) when a send was cut off part-way, since the peer then
        holds a torn message (or TLS record) and must not take it for a complete one; when
        the end cannot be written (the peer has gone); and when cancelled meanwhile. The
        caller bounds the wait (a peer that reads nothing can hold up a close_notify)."""
        if self._send_cut:
            self.abort()
            return
        try:
            await self.send_eof()
        except StreamBroken:
            self.abort()
            return
        except BaseException:
            self.abort()
            raise
        self.close()

    def abort(self) -> None:
        """Close with a TCP reset, so the peer cannot mistake it for a normal end."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close()


class PlainStream(_SocketIO):
    """A TCP or unix socket carrying plaintext."""

    unclean_eof = False

    async def receive_some(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        return bytes(await self.receive_view(max_bytes))

    async def receive_view(self, max_bytes: int = RECEIVE_SIZE) -> memoryview:
        """Like receive_some, without a copy: the view is valid until the caller next
        yields to trio (it is the process-wide scratch buffer). For the relay."""
        view = _PLAIN_VIEW[: min(max_bytes, RECEIVE_SIZE)]
        n = await self._recv_into(view)
        return _lend(view[:n])

    send_all = _SocketIO._send_raw  # no extra coroutine per message

    async def send_eof(self) -> None:
        _shutdown_write(self.sock)


class TLSStream(_SocketIO):
    """TLS over a socket through memory BIOs, with half-close. See the module docstring."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        received: bytes = b"",
    ) -> None:
        """`received`: the first bytes of the peer's TLS, already read from `sock` by
        whoever looked at them first (SNI routing, PostgreSQL's direct TLS)."""
        super().__init__(sock)
        self._incoming = ssl.MemoryBIO()
        if received:
            self._incoming.write(received)
        self._outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        # The _ssl object under SSLObject: the relay's read, write and pending go to it
        # straight, without ssl.py's wrapper method per call (SSLObject is a thin shell
        # over it, the same object since Python 3.7).
        self._tls: _RawTLS = getattr(self.ssl, "_sslobj", None) or self.ssl  # type: ignore[assignment]
        self._overflow = bytearray()
        self._eof_received = False
        self._eof_sent = False
        self._sending = False
        self._send_done = trio.lowlevel.ParkingLot()
        self.unclean_eof = False

    # -- handshake -----------------------------------------------------------------

    async def do_handshake(self, *, hold_last_flight: bool = False) -> None:
        """Complete the handshake. ssl.SSLError on failure (after sending OpenSSL's alert).

        With hold_last_flight, what OpenSSL wrote in its last step stays unsent until
        `send_held`: for a server, its TLS 1.3 session tickets (or its TLS 1.2 Finished).
        A server that judges the peer after the handshake (allow rules, a resumed session's
        lapsed verdict) can so refuse before the client has seen anything that looks like
        acceptance: a TLS 1.3 client takes the first ticket as the server's yes."""
        while True:
            try:
                self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    self._incoming.write_eof()
                continue
            except ssl.SSLError:
                await self._flush_alert()
                raise
            if not hold_last_flight:
                await self._flush()
            return

    async def send_held(self) -> None:
        """Send what `do_handshake(hold_last_flight=True)` held back (StreamBroken if the
        peer has gone)."""
        await self._flush()

    async def _flush_alert(self) -> None:
        """Best effort: deliver the alert OpenSSL queued for a failed handshake."""
        with trio.move_on_after(1):
            with contextlib.suppress(StreamBroken):
                await self._flush()

    async def await_first_record(self) -> bool:
        """TLS 1.3 client, just after the handshake: return once the server's first record
        has come: True for a session ticket or application data (kept for the next
        receive), False for the end of the stream (the next receive reports it, as b"").
        ssl.SSLError if it is an
        alert (the server refused our certificate: in TLS 1.3 it checks it only after
        our handshake is complete, RFC 8446 section 4.4.2.4); StreamBroken on a reset.
        Waits as long as the server says nothing: the caller bounds it."""
        while True:
            try:
                data = self.ssl.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                if self._outgoing.pending:
                    await self._flush()
                session = self.ssl.session
                if session is not None and session.has_ticket:
                    return True
                if not await self._fill():
                    self._incoming.write_eof()
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:
                self.unclean_eof = True
                data = b""
            if not data:
                self._eof_received = True
                return False
            self._overflow += data
            return True

    def peer_certificate(self) -> bytes | None:
        return self.ssl.getpeercert(binary_form=True)

    def presented_chain(self) -> tuple[bytes, ...]:
        """The certificates the peer sent in a full handshake, leaf first (DER); empty
        after a resumption, where the peer sends none (SSL_get_peer_cert_chain)."""
        return _chain_der(self.ssl, "get_unverified_chain")

    def verified_chain(self) -> tuple[bytes, ...]:
        """The path OpenSSL verified in a full handshake, leaf first, anchor last (DER);
        empty after a resumption (SSL_get0_verified_chain)."""
        return _chain_der(self.ssl, "get_verified_chain")

    def version(self) -> str:
        return self.ssl.version() or "?"

    def describe_tls(self) -> str:
        """For log lines: the version, and whether the session was resumed."""
        return f"{self.version()}{' resumed' if self.ssl.session_reused else ''}"

    # -- receiving -----------------------------------------------------------------

    async def receive_some(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        """Every plaintext byte already decryptable (up to max_bytes); b"" at EOF."""
        return bytes(await self.receive_view(max_bytes))

    async def receive_view(self, max_bytes: int = RECEIVE_SIZE) -> memoryview:
        """Like receive_some, without a copy where it can: the view is valid until the
        caller next yields to trio (it may be the process-wide scratch buffer)."""
        if self._overflow:
            data = bytes(self._overflow[:max_bytes])
            del self._overflow[:max_bytes]
            return memoryview(data)
        if self._eof_received:
            return memoryview(b"")
        limit = min(max_bytes, RECEIVE_SIZE)
        total = 0
        incoming = self._incoming
        tls = self._tls
        while True:
            if not incoming.pending and not incoming.eof and not tls.pending():
                # Nothing left to decrypt: reading now could only say "want read".
                if total:
                    break
                if self._outgoing.pending:
                    await self._flush()
                if not await self._fill():
                    incoming.write_eof()
                continue
            try:
                n = tls.read(limit - total, _PLAIN_VIEW[total:limit])
            except ssl.SSLWantReadError:
                if total:
                    break
                if self._outgoing.pending:
                    await self._flush()
                if not await self._fill():
                    incoming.write_eof()
                continue
            except ssl.SSLZeroReturnError:
                n = 0
            except ssl.SSLEOFError:
                self.unclean_eof = True
                n = 0
            except ssl.SSLError as exc:
                raise StreamBroken(ssl_reason(exc)) from exc
            if n == 0:
                self._eof_received = True
                break
            total += n
            if total >= limit:
                break
        if self._outgoing.pending:  # e.g. a KeyUpdate reply: flushing yields, so copy first
            copy = memoryview(bytes(_PLAIN_VIEW[:total]))
            await self._flush()
            return copy
        return _lend(_PLAIN_VIEW[:total])

    async def _fill(self) -> bool:
        """Move one socket read of ciphertext into the incoming BIO; False at TCP EOF."""
        n = await self._recv_into(_CIPHER_VIEW)
        if n == 0:
            return False
        self._incoming.write(_CIPHER_VIEW[:n])
        return True

    # -- sending -------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was already called")
        if not data:
            return
        if _CHECK_SCRATCH:
            _check_scratch(data)
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise StreamBroken(ssl_reason(exc)) from exc
        await self._flush()

    async def send_eof(self) -> None:
        """Send close_notify; receiving goes on. After the peer ended without one (an
        unclean EOF, which OpenSSL treats as fatal) no TLS record can be sent any more:
        end with a bare TCP FIN instead, as the peer did."""
        if self._eof_sent:
            return
        self._eof_sent = True
        if not self.unclean_eof:
            self._decrypt_waiting_records()
        if not self.unclean_eof:
            try:
                self.ssl.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # close_notify is queued; the peer's may come later
            except ssl.SSLError as exc:
                raise StreamBroken(ssl_reason(exc)) from exc
            await self._flush()
        if self.unclean_eof:
            _shutdown_write(self.sock)

    def _decrypt_waiting_records(self) -> None:
        """Empty the incoming BIO into the overflow buffer (see the module docstring)."""
        # OpenSSL may also hold decrypted bytes of a record a receive stopped part-way through.
        while (self._incoming.pending or self.ssl.pending()) and not self._eof_received:
            try:
                chunk = self.ssl.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLEOFError:
                self.unclean_eof = True
                chunk = b""
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError:
                return  # the next receive will meet the same error and report it
            if not chunk:
                self._eof_received = True
                return
            self._overflow += chunk

    async def _flush(self) -> None:
        """Write everything in the outgoing BIO to the socket, one writer at a time."""
        while self._sending:
            await self._send_done.park()
        if not self._outgoing.pending:
            return
        self._sending = True
        try:
            while self._outgoing.pending:
                await self._send_raw(self._outgoing.read())
        finally:
            self._sending = False
            if self._send_done:
                self._send_done.unpark_all()


def _shutdown_write(sock: socket.socket) -> None:
    """TCP FIN. A peer that has already gone entirely (ENOTCONN) needs no telling."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise StreamBroken(_os_reason(exc)) from exc


class _RawTLS(Protocol):
    """What the relay calls on the `_ssl` object under an SSLObject (its C methods): with a
    buffer, read returns the count read into it."""

    def read(self, size: int, buffer: memoryview, /) -> int: ...

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def pending(self) -> int: ...


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    return exc.strerror or str(exc)


Stream = PlainStream | TLSStream


def _chain_der(obj: ssl.SSLObject, method: str) -> tuple[bytes, ...]:
    """A certificate chain of a connection as DER. Public on SSLObject from Python 3.13;
    from 3.10 the same methods exist on the `_ssl` object underneath."""
    target = obj if hasattr(obj, method) else getattr(obj, "_sslobj", None)
    chain = getattr(target, method, lambda: None)()
    return tuple(cert.public_bytes(_ENCODING_DER) for cert in chain or ())


_ENCODING_DER = 2  # _ssl.ENCODING_DER: the certificates' public_bytes format
