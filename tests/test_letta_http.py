"""The Letta client's transport (letta_http): connections kept and reused, every way an
answer can be framed, and every way a call can fail told apart (sent or surely not)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import trustme
from aiohttp import web

from tests.conftest import eventually
from tracker import letta_http
from tracker.errors import LettaUnavailable
from tracker.letta import LettaClient
from tracker.letta_http import HttpPool, TransportError


class RawServer:
    """A TCP server answering each request with what ``reply`` returns (bytes written as
    they are, then the connection closed if ``close``); it counts connections."""

    def __init__(self, reply, close=False) -> None:
        self.reply, self.close = reply, close
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = await self.reply(request, len(self.requests))
                if answer is None:  # hang up without answering
                    break
                writer.write(answer)
                await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def answer_ok(request: bytes, n: int) -> bytes:
    return ok()


async def test_connections_are_kept_and_reused():
    async with RawServer(answer_ok) as srv:
        pool = HttpPool(srv.url)
        for _ in range(5):
            assert (await pool.request("GET", "/v1/runs/x")).body == b'{"ok": true}'
        await pool.close()
    assert srv.connections == 1 and len(srv.requests) == 5


async def test_concurrent_calls_open_at_most_limit_connections():
    async def slow(request: bytes, n: int) -> bytes:
        await asyncio.sleep(0.05)
        return ok()

    async with RawServer(slow) as srv:
        pool = HttpPool(srv.url, limit=2)
        answers = await asyncio.gather(*(pool.request("GET", "/x") for _ in range(6)))
        await pool.close()
    assert [a.status for a in answers] == [200] * 6
    assert srv.most_open == 2 and srv.connections == 2


async def test_request_carries_prefix_query_headers_and_body():
    async with RawServer(answer_ok) as srv:
        pool = HttpPool(srv.url + "/let%20ta/", {"Authorization": "Bearer k-123"})
        await pool.request("POST", "/v1/agents/agent-1/messages/async", b'{"a": 1}')
        await pool.request("GET", "/v1/runs/", params=[("statuses", "completed"),
                                                          ("after", "run a&b")])
        await pool.close()
    post, get = srv.requests
    assert post.startswith(b"POST /let%20ta/v1/agents/agent-1/messages/async HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k-123\r\n" in post
    assert b"\r\nContent-Type: application/json\r\nContent-Length: 8\r\n" in post
    assert post.endswith(b'\r\n\r\n{"a": 1}')
    assert get.startswith(b"GET /let%20ta/v1/runs/?statuses=completed&after=run+a%26b HTTP/1.1")
    assert b"Content-Length" not in get


async def test_a_chunked_answer_is_read_whole(aiohttp_server):
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Retry-After": "7"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"parts": ', b'[1, 2, ', b"3]}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/x", chunked)
    server = await aiohttp_server(app)
    pool = HttpPool(str(server.make_url("")))
    answer = await pool.request("GET", "/x")
    again = await pool.request("GET", "/x")
    await pool.close()
    assert (answer.status, answer.body, answer.headers["retry-after"]) == (
        200, b'{"parts": [1, 2, 3]}', "7")
    assert again.body == answer.body


async def test_an_answer_without_a_length_ends_with_its_connection():
    async def unframed(request: bytes, n: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"n\": %d}" % n

    async with RawServer(unframed, close=True) as srv:
        pool = HttpPool(srv.url)
        first = await pool.request("GET", "/x")
        second = await pool.request("GET", "/x")
        await pool.close()
    assert (first.body, second.body) == (b'{"n": 1}', b'{"n": 2}')
    assert srv.connections == 2


async def test_a_request_says_it_takes_no_encoding():
    """Without Accept-Encoding any is acceptable (RFC 9110), and a proxy may gzip what this
    client does not unpack."""
    async def echo(request: bytes, n: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

    async with RawServer(echo) as srv:
        pool = HttpPool(srv.url)
        await pool.request("GET", "/x")
        await pool.close()
    assert b"\r\nAccept-Encoding: identity\r\n" in srv.requests[0]


async def test_an_answer_without_a_length_cut_by_a_reset_is_an_error():
    """A body that ends with its connection, cut short by a reset (not closed): it was taken
    whole, a truncated body read as the answer."""
    import socket
    import struct

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"cut": ')
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, not a close

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = HttpPool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(TransportError):
            await pool.request("GET", "/x")
    finally:
        await pool.close()
        server.close()


async def test_an_interim_answer_is_skipped():
    async def with_continue(request: bytes, n: int) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"{}")

    async with RawServer(with_continue) as srv:
        pool = HttpPool(srv.url)
        answer = await pool.request("POST", "/x", b"{}")
        await pool.close()
    assert (answer.status, answer.body) == (200, b"{}")


async def test_a_connection_lost_after_an_interim_answer_is_an_error():
    async def continue_then_hang_up(request: bytes, n: int) -> bytes | None:
        return b"HTTP/1.1 100 Continue\r\n\r\n"

    async with RawServer(continue_then_hang_up, close=True) as srv:
        pool = HttpPool(srv.url)
        with pytest.raises(TransportError, match="closed the connection"):
            await pool.request("POST", "/x", b"{}")
        await pool.close()


async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    async with RawServer(answer_ok, close=True) as srv:
        pool = HttpPool(srv.url)
        await pool.request("POST", "/x", b"{}")
        await eventually(lambda: srv.open == 0)  # the server has closed it
        await asyncio.sleep(0.05)  # and its FIN has reached the pool
        await pool.request("POST", "/x", b"{}")
        await pool.close()
    assert srv.connections == 2 and len(srv.requests) == 2


async def test_a_connection_idle_too_long_is_not_reused(monkeypatch):
    monkeypatch.setattr(letta_http, "KEEPALIVE_S", 0.5)
    async with RawServer(answer_ok) as srv:
        pool = HttpPool(srv.url)
        await pool.request("POST", "/x", b"{}")
        await pool.request("POST", "/x", b"{}")
        await asyncio.sleep(0.6)
        await pool.request("POST", "/x", b"{}")
        await pool.close()
    assert srv.connections == 2 and len(srv.requests) == 3


async def test_a_kept_connection_lost_before_the_answer():
    """The server hangs up on the second request of a connection (an idle close racing it):
    a GET is sent again on a new connection; a POST is not (Letta may have created the run)
    and fails as possibly sent."""
    async def second_on_a_connection_hangs_up(request: bytes, n: int) -> bytes | None:
        return None if n == 2 else ok()

    for method, body in (("GET", None), ("POST", b"{}")):
        async with RawServer(second_on_a_connection_hangs_up) as srv:
            pool = HttpPool(srv.url)
            await pool.request(method, "/x", body)
            if method == "GET":
                assert (await pool.request(method, "/x", body)).status == 200
                assert srv.connections == 2 and len(srv.requests) == 3
            else:
                with pytest.raises(TransportError, match="closed the connection") as e:
                    await pool.request(method, "/x", body)
                assert e.value.sent and len(srv.requests) == 2
            await pool.close()


async def test_no_answer_in_time_is_an_error_and_the_connection_is_dropped():
    async def first_never_answers(request: bytes, n: int) -> bytes:
        if n == 1:
            await asyncio.sleep(10)
        return ok()

    async with RawServer(first_never_answers) as srv:
        pool = HttpPool(srv.url, timeout_s=0.2)
        with pytest.raises(TransportError, match="no answer within 0.2s") as e:
            await pool.request("POST", "/x", b"{}")
        assert e.value.sent
        assert (await pool.request("POST", "/x", b"{}")).status == 200
        await pool.close()
    assert srv.connections == 2


async def test_the_wait_for_a_free_connection_counts_and_sends_nothing():
    async def never_answers(request: bytes, n: int) -> bytes:
        await asyncio.sleep(10)
        return ok()

    async with RawServer(never_answers) as srv:
        pool = HttpPool(srv.url, timeout_s=5, limit=1)
        first = asyncio.create_task(pool.request("POST", "/x", b"{}"))
        await eventually(lambda: srv.requests)  # it holds the only connection
        # the second's whole timeout passes while it waits (two calls with the same timeout
        # raced: the first's, firing first, could free the connection just in time)
        pool._timeout_s = 0.2
        with pytest.raises(TransportError) as second:
            await pool.request("POST", "/x", b"{}")
        assert not second.value.sent
        first.cancel()
        await pool.close()
    assert len(srv.requests) == 1


async def test_a_cancelled_call_does_not_leave_its_connection_in_the_pool():
    async def slow_first(request: bytes, n: int) -> bytes:
        await asyncio.sleep(0.3 if n == 1 else 0)
        return ok(b'{"n": %d}' % n)

    async with RawServer(slow_first) as srv:
        pool = HttpPool(srv.url)
        call = asyncio.create_task(pool.request("GET", "/x"))
        await eventually(lambda: srv.requests)  # the server has it, and takes its time
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # a new connection: the first one's late answer must not be read as this one's
        assert (await pool.request("GET", "/x")).body == b'{"n": 2}'
        await pool.close()
    assert srv.connections == 2


async def test_a_garbled_answer_is_an_error():
    async def garbled(request: bytes, n: int) -> bytes:
        return b"SMTP ready\r\n\r\n"

    async with RawServer(garbled) as srv:
        pool = HttpPool(srv.url)
        with pytest.raises(TransportError, match="not HTTP/1.1") as e:
            await pool.request("GET", "/x")
        assert e.value.sent
        await pool.close()


@contextlib.asynccontextmanager
async def started(url: str) -> AsyncIterator[LettaClient]:
    letta = LettaClient(url)
    await letta.start()
    try:
        yield letta
    finally:
        await letta.close()


async def test_a_refused_connection_surely_sent_nothing(unused_tcp_port):
    async with started(f"http://127.0.0.1:{unused_tcp_port}") as letta:
        with pytest.raises(LettaUnavailable, match="unreachable") as e:
            await letta.send_async("agent-1", {"messages": []})
    assert e.value.sent is False
    assert letta.calls[("messages_async", "unreachable")] == 1


def in_a_minute() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)


@pytest.mark.parametrize("header, low, high", [(lambda: "3", 3.0, 3.0),
                                               (in_a_minute, 50.0, 61.0)],
                         ids=["seconds", "http-date"])
async def test_retry_after_reaches_the_client(header, low, high):
    """In seconds, or as an HTTP-date (as a proxy in front of Letta may send it)."""
    header = header()

    async def busy(request: bytes, n: int) -> bytes:
        body = b'{"detail": "busy"}'
        return b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: %s\r\nContent-Length: %d" \
               b"\r\n\r\n%s" % (header.encode(), len(body), body)

    async with RawServer(busy) as srv, started(srv.url) as letta:
        with pytest.raises(LettaUnavailable, match="429: busy") as e:
            await letta.send_async("agent-1", {"messages": []})
    assert low <= e.value.retry_after <= high
    assert e.value.sent is False


async def test_https():
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok(b'{"tls": true}'))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "localhost", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = HttpPool(f"https://localhost:{port}", ssl_context=client_ctx)
        assert (await pool.request("GET", "/x")).body == b'{"tls": true}'
        await pool.close()
        untrusting = HttpPool(f"https://localhost:{port}")  # the system's CAs only
        with pytest.raises(TransportError, match="cannot connect") as e:
            await untrusting.request("GET", "/x")
        assert e.value.sent is False
    finally:
        server.close()


async def test_no_connection_in_time_surely_sent_nothing(monkeypatch):
    async def slow_connect(self):
        await asyncio.sleep(10)

    monkeypatch.setattr(HttpPool, "_connect", slow_connect)
    pool = HttpPool("http://127.0.0.1:9", timeout_s=0.1)
    with pytest.raises(TransportError, match="no answer within 0.1s") as e:
        await pool.request("POST", "/x", b"{}")
    assert e.value.sent is False
