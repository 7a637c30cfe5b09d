"""Letta's callback POST: one try, httpx's headers and compact JSON, httpx's error texts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from yarl import URL

# What httpx 0.28.1 (Letta's client) sends; receivers may log or check these.
HEADERS = {
    "Accept": "*/*",
    "Accept-Encoding": "gzip, deflate, br",
    "Connection": "keep-alive",
    "User-Agent": "python-httpx/0.28.1",
    "Content-Type": "application/json",
}
Outcome = tuple[int | None, str | None]  # (callback_status_code, error text)


class CallbackSender:
    """Posts callbacks on one session; never retries, whatever the answer."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the session (inside the app's cleanup context)."""
        if self._session is None:
            # Letta opens a fresh httpx client per callback, so nothing queues behind a slow
            # receiver; a large pool keeps that property without unbounded sockets.
            connector = aiohttp.TCPConnector(limit=1000)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, payload: dict[str, Any], timeout_s: float) -> Outcome:
        """POST once; the status code of any answer, or Letta's text for a failure."""
        problem = _url_problem(url)
        if problem is not None:
            return None, problem
        await self.start()
        assert self._session is not None
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        # httpx's timeout=5.0 bounds connect and each read, not the whole exchange.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        try:
            async with self._session.post(
                url, data=body, headers=HEADERS, timeout=timeout, allow_redirects=False
            ) as answer:
                await answer.read()
                return answer.status, None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return None, httpx_error_text(exc)


def unreachable_text() -> str:
    """The error text of a receiver nobody answers at."""
    return _exc_repr("ConnectError", "All connection attempts failed")


def httpx_error_text(exc: BaseException) -> str:
    """What `repr(e)` of the matching httpx exception reads."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _exc_repr("ConnectTimeout", "")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return _exc_repr("ReadTimeout", "")
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
        return unreachable_text()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return _exc_repr("RemoteProtocolError", "Server disconnected without sending a response.")
    return _exc_repr(type(exc).__name__, str(exc))


def _url_problem(url: str) -> str | None:
    # httpx refuses a URL without an http(s) scheme before connecting; so does Letta's callback.
    try:
        scheme = URL(url).scheme
    except (ValueError, TypeError):
        scheme = ""
    if not scheme:
        return _exc_repr(
            "UnsupportedProtocol", "Request URL is missing an 'http://' or 'https://' protocol."
        )
    if scheme not in ("http", "https"):
        message = f"Request URL has an unsupported protocol '{scheme}://'."
        return _exc_repr("UnsupportedProtocol", message)
    return None


def _exc_repr(name: str, message: str) -> str:
    return f"{name}({message!r})"
