"""tunnel.http, the HTTP/1.1 layer over trio streams: the server's one exchange per
connection and the client's GET, over in-memory streams (no sockets), the requests written
by an h11 client or by hand where they must be malformed."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from tunnel import http


class Recorder:
    """A handler that keeps the requests it is given and answers each with `response`."""

    def __init__(self, response: http.Response | None = None) -> None:
        self.requests: list[http.Request] = []
        self.response = response or http.Response(200, "application/json", b'{"ok": true}\n')

    async def __call__(self, request: http.Request) -> http.Response:
        await trio.lowlevel.checkpoint()
        self.requests.append(request)
        return self.response


def h11_request(method: str, target: str, body: bytes = b"", *, chunked: bool = False, **headers: str) -> bytes:
    """A whole request as an h11 client writes it: Host, the given headers (underscores
    as dashes), and the body with Content-Length, or chunked in two pieces."""
    client = h11.Connection(h11.CLIENT)
    fields = [("Host", "example"), *((name.replace("_", "-"), value) for name, value in headers.items())]
    fields.append(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body))))
    data = client.send(h11.Request(method=method, target=target, headers=fields)) or b""
    pieces = [body[: len(body) // 2], body[len(body) // 2 :]] if chunked else [body]
    for piece in pieces:
        if piece:
            data += client.send(h11.Data(data=piece)) or b""
    return data + (client.send(h11.EndOfMessage()) or b"")


def parse_answer(data: bytes, method: bytes = b"GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers by lower-case name, body) of a whole answer to `method`, read by
    an h11 client."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "example")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    head = client.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        body += event.data
    return head.status_code, {k.decode(): v.decode() for k, v in head.headers}, body


async def exchange(
    request: bytes, handler: http.Handler, methods: tuple[str, ...] = ("GET",), max_body: int = http.MAX_BODY
) -> tuple[int, dict[str, str], bytes]:
    """Send `request` to serve_one over a memory stream pair; its whole answer, parsed."""
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(request)
    await http.serve_one(server, handler, methods=methods, max_body=max_body)
    await server.aclose()
    answer = b""
    while chunk := await client.receive_some():
        answer += chunk
    return parse_answer(answer, b"HEAD" if request.startswith(b"HEAD ") else b"GET")


async def test_a_get_reaches_the_handler_with_its_query_string_apart_and_is_answered_with_connection_close() -> None:
    handler = Recorder()
    status, headers, body = await exchange(h11_request("GET", "/healthz?verbose=1&x=%20", Accept="*/*"), handler)
    assert (status, body) == (200, b'{"ok": true}\n')
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"
    [request] = handler.requests
    assert (request.method, request.path, request.query, request.body) == ("GET", "/healthz", "verbose=1&x=%20", b"")
    assert request.header("ACCEPT") == "*/*"
    assert request.header("host") == "example"


async def test_the_client_get_reads_status_content_type_and_body_from_the_server() -> None:
    client, server = trio.testing.memory_stream_pair()
    handler = Recorder(http.Response(503, "text/plain", b"x" * 100_000))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.serve_one, server, handler)
        response = await http.get(client, "/metrics?a=b", host="127.0.0.1:9100")
    assert response == http.Response(503, "text/plain", b"x" * 100_000)
    assert handler.requests[0].header("host") == "127.0.0.1:9100"
    assert (handler.requests[0].path, handler.requests[0].query) == ("/metrics", "a=b")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_post_body_up_to_the_cap_reaches_the_handler_with_its_content_type(chunked: bool) -> None:
    handler = Recorder(http.Response(201, "application/pkcs7-mime", b"issued"))
    body = bytes(range(256)) * 256  # 64 KiB exactly
    request = h11_request("POST", "/est/simpleenroll", body, chunked=chunked, Content_Type="application/pkcs10")
    status, headers, answer = await exchange(request, handler, methods=("GET", "POST"), max_body=64 * 1024)
    assert (status, headers["content-type"], answer) == (201, "application/pkcs7-mime", b"issued")
    [seen] = handler.requests
    assert (seen.method, seen.content_type, seen.body) == ("POST", "application/pkcs10", body)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_post_body_past_the_cap_gets_413_and_never_reaches_the_handler(chunked: bool) -> None:
    handler = Recorder()
    request = h11_request("POST", "/est/simpleenroll", b"x" * (64 * 1024 + 1), chunked=chunked)
    status, _, body = await exchange(request, handler, methods=("POST",), max_body=64 * 1024)
    assert status == 413
    assert body == b"a request body may have at most 65536 bytes\n"
    assert handler.requests == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host: RFC 9112 section 3.2
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        b"GET /heal thz HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n",
    ],
    ids=["no-request-line", "no-host", "bad-content-length", "space-in-target", "space-in-header-name"],
)
async def test_a_malformed_request_gets_400_and_never_reaches_the_handler(request_bytes: bytes) -> None:
    handler = Recorder()
    status, headers, body = await exchange(request_bytes, handler)
    assert status == 400
    assert headers["connection"] == "close"
    assert body.endswith(b"\n")
    assert handler.requests == []


async def test_a_request_head_past_8192_bytes_gets_431() -> None:
    handler = Recorder()
    status, _, _ = await exchange(h11_request("GET", "/healthz", Cookie="c" * 9000), handler)
    assert status == 431
    assert handler.requests == []


@pytest.mark.parametrize("method", ["POST", "HEAD", "DELETE"])
async def test_a_method_not_served_gets_405_naming_the_allowed_ones(method: str) -> None:
    handler = Recorder()
    status, headers, body = await exchange(h11_request(method, "/healthz", b"x" if method == "POST" else b""), handler)
    assert (status, headers["allow"]) == (405, "GET")
    assert body == (b"" if method == "HEAD" else b"only GET\n"), "an answer to HEAD is its head alone"
    assert headers["content-length"] == "9"
    assert handler.requests == []


async def test_a_client_that_sends_half_a_request_is_left_unanswered_at_the_request_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    received: list[float] = []
    await client.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
    started = trio.current_time()
    await http.serve_one(server, Recorder(), request_timeout=2.0, received=lambda: received.append(0))
    assert trio.current_time() - started == pytest.approx(2.0)
    assert received == []
    await server.aclose()
    assert await client.receive_some() == b""


async def test_an_answer_the_client_does_not_take_is_given_up_at_the_response_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()  # a send waits for the peer to read
    received: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, h11_request("GET", "/metrics"))
        started = trio.current_time()
        await http.serve_one(server, Recorder(), response_timeout=5.0, received=lambda: received.append(0))
    assert trio.current_time() - started == pytest.approx(5.0)
    assert received == [0]


async def test_a_client_that_closes_without_a_request_is_not_answered() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.aclose()
    handler = Recorder()
    await http.serve_one(server, handler)
    assert handler.requests == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", "peer closed connection without sending complete"),
        (b"", "the server closed the connection without answering"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP answer"),
    ],
    ids=["cut-short", "closed", "not-http"],
)
async def test_the_client_get_raises_no_answer_for_an_answer_it_cannot_read_whole(answer: bytes, reason: str) -> None:
    client, server = trio.testing.memory_stream_pair()

    async def serve() -> None:
        await server.receive_some()
        await server.send_all(answer)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(http.NoAnswer, match=reason):
            await http.get(client, "/healthz")


async def test_the_client_get_refuses_an_answer_past_its_cap() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.serve_one, server, Recorder(http.Response(200, body=b"x" * 2000)))
        with pytest.raises(http.NoAnswer, match="longer than 1000 bytes"):
            await http.get(client, "/metrics", max_answer=1000)


async def test_a_client_that_expects_100_continue_is_told_to_send_its_body() -> None:
    client, server = trio.testing.memory_stream_pair()
    handler = Recorder()
    head = b"POST /est/simpleenroll HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: http.serve_one(server, handler, methods=("POST",)))
        await client.send_all(head)
        assert await client.receive_some() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send_all(b"csr!")
    assert [r.body for r in handler.requests] == [b"csr!"]
