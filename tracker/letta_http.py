"""The Letta client's HTTP/1.1 transport: keep-alive connections to the one Letta server.

Not aiohttp's client session (which the relay and the CLI use): on every submit's path it
cost more than twice the CPU of this transport (167 µs a call against 71, side by side:
``benchmarks/client_cpu.py``, BENCHMARKS-HISTORY.md), and the tracker's calls to Letta need little
of what it offers: one server, JSON bodies read whole, no cookies, redirects, proxies or
streaming. What an answer means is parsed by httptools (llhttp, the parser of Node.js and
uvicorn): this module only keeps the connections and frames the requests.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

import httptools

from tracker import __version__

#: an idle connection older than this is closed, not reused. Under uvicorn's default (Letta's
#: server: it closes a connection idle for 5 s) a request sent on a connection just as the
#: server closes it is lost, and a submit lost so must be looked up at Letta before it is sent
#: again: so a connection is given up before the server would. A server that closes one even
#: sooner is seen doing so (its FIN) and the connection dropped from the pool.
KEEPALIVE_S = 4.0
#: characters a path keeps as they are (the rest is percent-encoded, as yarl does; a "%"
#: is taken as already encoding, as yarl takes it)
PATH_SAFE = "/:@-._~!$&'()*+,;=%"
#: methods sent again, once, on a new connection when a reused one turns out closed before
#: any answer: never a POST, which could create a second run at Letta
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class TransportError(Exception):
    """A call that got no answer. ``sent`` is False only when the request surely never
    reached the server (no connection could be made)."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection, one request at a time; its answer is parsed as the bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.pending: asyncio.Future[Answer] | None = None
        self.closed = False
        self.reusable = False
        self.answered = False  # any byte of the answer came
        self.idle_since = 0.0
        self._start()

    def _start(self) -> None:
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._head_done = False
        self._framed = True  # the body's end is known (a length, or chunks)

    def send(self, data: bytes, pending: asyncio.Future[Answer]) -> None:
        self.pending, self.reusable, self.answered = pending, False, False
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.pending is None or self.pending.done():
            self.close()  # nothing was asked (a server's parting 408, say): not reusable
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            self._fail(f"Letta's answer is not HTTP/1.1 we can read: {e}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.pending is None or self.pending.done():
            return
        if self._head_done and not self._framed and exc is None:
            self._finish(keep_alive=False)  # a body without a length ends with the connection
        else:  # a reset mid-body too: the body was cut short, not ended
            self._fail("Letta closed the connection" + (f": {exc}" if exc else ""))

    # --- httptools' callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._start()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._head_done = True
        chunked = "chunked" in self._headers.get("transfer-encoding", "").lower()
        self._framed = chunked or "content-length" in self._headers

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            self._start()  # an interim answer (100 Continue): the real one follows
            return
        # asked now: the parser forgets it once the next message begins
        self._finish(self.parser.should_keep_alive())

    def _finish(self, keep_alive: bool) -> None:
        self.reusable = keep_alive and not self.closed
        if self.pending is not None and not self.pending.done():
            self.pending.set_result(Answer(self.parser.get_status_code(), self._headers,
                                           b"".join(self._body)))

    def _fail(self, message: str) -> None:
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(TransportError(message, sent=True))


class HttpPool:
    """Requests to one server (scheme, host, port and a path prefix, from ``base_url``), on
    at most ``limit`` connections kept open between calls."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None,
                 timeout_s: float = 30.0, limit: int = 100,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" \
            else None
        self._prefix = url.path.rstrip("/")
        # Accept-Encoding said: none means any to HTTP, and a proxy may then gzip what this
        # client does not unpack
        fixed = {"Host": url.netloc.rpartition("@")[2], "User-Agent": f"tracker/{__version__}",
                 "Accept-Encoding": "identity", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def request(self, method: str, path: str, body: bytes | None = None,
                      params: list[tuple[str, str]] | None = None,
                      content_type: str = "application/json") -> Answer:
        """One call, its answer read whole; raises TransportError (and nothing else) when
        there is none, a timeout included."""
        data = self._head(method, path, params, body, content_type) + (body or b"")
        connected = False
        try:
            # the wait for a free connection counts too (as in aiohttp's total timeout)
            async with asyncio.timeout(self._timeout_s), self._slots:
                while True:
                    conn = self._take()
                    reused = conn is not None
                    conn = conn or await self._connect()
                    connected = True
                    try:
                        return await self._exchange(conn, data)
                    except TransportError:
                        # a kept connection the server had just closed, before any answer
                        if reused and not conn.answered and method in IDEMPOTENT:
                            continue
                        raise
        except TimeoutError:
            raise TransportError(f"no answer within {self._timeout_s:g}s",
                                 sent=connected) from None

    def _head(self, method: str, path: str, params: list[tuple[str, str]] | None,
              body: bytes | None, content_type: str) -> bytes:
        target = quote(self._prefix + path, safe=PATH_SAFE)
        if params:
            target += "?" + urlencode(params)
        length = "" if body is None else \
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        return f"{method} {target} HTTP/1.1\r\n{length}".encode("latin-1") + self._fixed + \
            b"\r\n"

    async def _exchange(self, conn: _Connection, data: bytes) -> Answer:
        pending = asyncio.get_running_loop().create_future()
        try:
            conn.send(data, pending)
            return await pending
        finally:
            self._release(conn)

    def _take(self) -> _Connection | None:
        """The most recently used idle connection still open, or None."""
        stale_before = time.monotonic() - KEEPALIVE_S
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not conn.transport.is_closing() \
                    and conn.idle_since > stale_before:
                return conn
            self._drop(conn)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                _Connection, self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._ssl else None)
        except OSError as e:  # refused, unresolvable, TLS refused: nothing was sent
            raise TransportError(f"cannot connect to {self._host}:{self._port}: {e}",
                                 sent=False) from e
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to the pool when its answer was read whole and the server keeps it open;
        closed otherwise (a timeout or a cancel mid-answer leaves it unusable)."""
        if conn.reusable and not conn.closed and conn.pending is not None \
                and conn.pending.done() and not conn.pending.cancelled():
            conn.pending = None
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def close(self) -> None:
        for conn in list(self._open):
            self._drop(conn)
        self._idle.clear()
