"""HTTP/1.1 on trio streams through h11 (sans-IO): serve one request per connection, and a
client GET.

The server side reads one request (head and body) from any trio stream, hands it to a
handler as a `Request`, and writes the handler's `Response` with `Connection: close`
(RFC 9112 section 9.6): one exchange per connection, so no keep-alive and no pipelining.
The status address uses it over TCP and unix sockets; it takes bodies and content types
for the services that will be posted to.

The client side (`get`, `fetch`) asks for one page and reads the whole answer: `tunnel
status` and the --workers supervisor use it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

from tunnel.config import Address

MAX_HEAD = 8192  # bytes of request line and headers; past it 431 (RFC 6585 section 5)
MAX_BODY = 64 * 1024  # bytes of request body a server takes by default; past it 413
MAX_ANSWER = 64 * 1024 * 1024  # bytes of response body a client takes by default
REQUEST_TIMEOUT = 2.0  # seconds a client has to send its whole request
RESPONSE_TIMEOUT = 5.0  # seconds a client has to take the whole answer
_RECEIVE_SIZE = 65536


@dataclass(frozen=True)
class Request:
    """One request as the server read it. `path` is the request target up to its `?`
    (origin-form, RFC 9112 section 3.2.1; other forms are passed whole), `query` what
    follows the `?` (empty if none), `headers` (lower-case name, value) pairs in the order
    sent, `body` the whole body (never more than the server's `max_body` bytes)."""

    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)

    @property
    def content_type(self) -> str | None:
        """The Content-Type header, as sent (parameters included), or None."""
        return self.header("content-type")


@dataclass(frozen=True)
class Response:
    """An answer: HTTP status code, Content-Type, body, and any further headers as (name,
    value) pairs. Content-Length and Connection are the layer's to write."""

    status: int
    content_type: str = "text/plain"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


class NoAnswer(Exception):
    """A client request got no whole answer: the server could not be reached, it did not
    answer in time, it closed the connection early, or it did not speak HTTP/1.x. The
    message says which, e.g. `[Errno 111] Connection refused` or `timed out`."""


# -- the server side ----------------------------------------------------------------------


async def serve_one(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    methods: Collection[str] = ("GET",),
    max_body: int = MAX_BODY,
    request_timeout: float = REQUEST_TIMEOUT,
    response_timeout: float = RESPONSE_TIMEOUT,
    received: Callable[[], None] = lambda: None,
) -> None:
    """Read one request from `stream`, answer it with `handler(request)`, and return; the
    caller closes the stream.

    The client has `request_timeout` seconds to send the whole request, or the stream is
    left unanswered; `received()` is called once it has (or once the layer knows its own
    answer), and the answer then has `response_timeout` seconds to be taken. Answered by
    the layer itself, without calling `handler` (RFC 9110 section 15): a head over
    MAX_HEAD bytes gets 431; a method not in `methods` 405 with an Allow header; a body
    longer than `max_body` bytes 413; a request h11 rejects (a malformed request line or
    header, HTTP/1.1 without Host (RFC 9112 section 3.2), a body cut short) 400, or 501 for
    a transfer coding other than chunked, with h11's reason as the body. The answer to a
    HEAD request is sent without its body.

    Errors: trio.BrokenResourceError/ClosedResourceError when the client goes away;
    whatever `handler` raises."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    read: tuple[str, Request | Response] | None = None
    with trio.move_on_after(request_timeout):
        read = await _read_request(connection, stream, methods, max_body)
    if read is None:
        return
    received()
    method, request = read
    response = await handler(request) if isinstance(request, Request) else request
    with trio.move_on_after(response_timeout):
        await stream.send_all(_serialise(connection, response, with_body=method != "HEAD"))


async def _read_request(
    connection: h11.Connection, stream: trio.abc.Stream, methods: Collection[str], max_body: int
) -> tuple[str, Request | Response] | None:
    """(the method, "" if unknown; the request, or the layer's own answer to it), or None
    if the client closed without a request."""
    method = ""
    try:
        head = await _next_event(connection, stream)
        if not isinstance(head, h11.Request):  # the client closed without a request
            return None
        method = head.method.decode("ascii")
        if _head_size(head) > MAX_HEAD:  # h11 checks only a head still incomplete
            return method, Response(431, body=f"a request head may have at most {MAX_HEAD} bytes\n".encode())
        if method not in methods:
            allow = ", ".join(methods)
            return method, Response(405, body=f"only {allow}\n".encode(), headers=(("Allow", allow),))
        headers = tuple((name.decode("ascii"), value.decode("latin-1")) for name, value in head.headers)
        length = next((value for name, value in headers if name == "content-length"), None)
        if length is not None and int(length) > max_body:  # h11 checked it is a number
            return method, _too_large(max_body)
        if connection.they_are_waiting_for_100_continue:  # RFC 9110 section 10.1.1
            await stream.send_all(
                connection.send(h11.InformationalResponse(status_code=100, headers=[], reason="Continue")) or b""
            )
        body = bytearray()
        while not isinstance(event := await _next_event(connection, stream), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    return method, _too_large(max_body)
    except h11.RemoteProtocolError as exc:
        return method, Response(exc.error_status_hint, body=f"{exc}\n".encode())
    path, _, query = head.target.decode("ascii").partition("?")  # h11 allows ASCII only
    return method, Request(method, path, query, headers, bytes(body))


def _head_size(head: h11.Request) -> int:
    """The bytes of a request line and headers as sent, but for whitespace around values."""
    line = len(head.method) + len(head.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + len(b": \r\n") for name, value in head.headers) + 2


def _too_large(max_body: int) -> Response:
    return Response(413, body=f"a request body may have at most {max_body} bytes\n".encode())


def _serialise(connection: h11.Connection, response: Response, *, with_body: bool) -> bytes:
    """The whole answer as bytes; the head alone if not `with_body` (the answer to a HEAD
    request, RFC 9110 section 9.3.2)."""
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Connection", "close"),
        *response.headers,
    ]
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    data = connection.send(h11.Response(status_code=response.status, headers=headers, reason=reason)) or b""
    if response.body and with_body:
        data += connection.send(h11.Data(data=response.body)) or b""
    return data + (connection.send(h11.EndOfMessage()) or b"")


async def _next_event(connection: h11.Connection, stream: trio.abc.ReceiveStream) -> h11.Event:
    """The next whole event the peer sent, reading from `stream` as h11 needs (an empty
    read tells h11 the peer closed). Errors: h11.RemoteProtocolError for what h11 rejects."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(bytes(await stream.receive_some(_RECEIVE_SIZE)))
        else:
            assert isinstance(event, h11.Event)  # not PAUSED: that comes only after a whole message
            return event


# -- the client side ----------------------------------------------------------------------


async def get(stream: trio.abc.Stream, path: str, *, host: str = "localhost", max_answer: int = MAX_ANSWER) -> Response:
    """GET `path` over `stream` (HTTP/1.1, Host: `host`, Connection: close) and read the
    whole answer: its status, Content-Type ("" if none) and body. The caller closes the
    stream. Errors: NoAnswer if the answer is not HTTP/1.x, is cut short, or has a body
    over `max_answer` bytes; trio.BrokenResourceError if the server goes away first."""
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=path, headers=[("Host", host), ("Connection", "close")])
    await stream.send_all((connection.send(request) or b"") + (connection.send(h11.EndOfMessage()) or b""))
    first = await stream.receive_some(_RECEIVE_SIZE)
    if not first:
        raise NoAnswer("the server closed the connection without answering")
    connection.receive_data(bytes(first))
    try:
        head = await _next_event(connection, stream)
        while isinstance(head, h11.InformationalResponse):
            head = await _next_event(connection, stream)
        assert isinstance(head, h11.Response)  # h11: a client's first events are these, or an error
        body = bytearray()
        while not isinstance(event := await _next_event(connection, stream), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_answer:
                    raise NoAnswer(f"an answer longer than {max_answer} bytes")
    except h11.RemoteProtocolError as exc:
        raise NoAnswer(f"not an HTTP answer: {exc}") from exc
    content_type = next((value for name, value in head.headers if name == b"content-type"), b"")
    return Response(head.status_code, content_type.decode("latin-1"), bytes(body))


async def fetch(address: Address, path: str, *, within: float = 5.0) -> Response:
    """GET `path` from a TCP address or a unix socket path with `get`, all within `within`
    seconds. Errors: NoAnswer for every way it can fail (refused, unreachable, timed out,
    closed early, not HTTP), its message the reason alone."""
    try:
        with trio.fail_after(within):
            if address.path is not None:
                stream: trio.abc.Stream = await trio.open_unix_socket(address.path)
            else:
                stream = await trio.open_tcp_stream(address.host, address.port)
            async with stream:
                return await get(stream, path, host="localhost" if address.path is not None else str(address))
    except trio.TooSlowError:
        raise NoAnswer("timed out") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise NoAnswer(_reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    """What went wrong, as an OSError says it (`[Errno 111] Connection refused`): trio's
    open_tcp_stream wraps each address's failure in an ExceptionGroup behind a message
    that only says they all failed."""
    if isinstance(exc.__cause__, OSError):  # trio.BrokenResourceError from a reset
        return str(exc.__cause__)
    if isinstance(exc.__cause__, BaseExceptionGroup):
        failures = {each.errno for each in exc.__cause__.exceptions if isinstance(each, OSError) and each.errno}
        if failures:
            return "; ".join(f"[Errno {number}] {os.strerror(number)}" for number in sorted(failures))
    return str(exc) or type(exc).__name__
