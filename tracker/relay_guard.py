"""The relay's SSRF guard: which destinations a user's callback_url may reach.

The check is made on the address actually dialled, at delivery time. Names are checked inside
the relay session's resolver (``GuardedResolver``), so the connector connects only to the
addresses that passed: there is no window between check and connect for DNS rebinding, and,
unlike connecting by IP with a Host header, TLS still verifies the certificate against the
name. aiohttp skips the resolver for IP literals, so ``check_url`` checks those itself (a
literal cannot rebind).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: cloud metadata services (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS IPv6: fd00:ec2::254)
METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254"))


class RefusedDestination(OSError):
    """The callback URL may not be reached (scheme, or a forbidden address)."""


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped or 6to4), which is what gets reached."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip.sixtofour or ip
    return ip


def refusal(address: str, allow_private: bool) -> str | None:
    """Why ``address`` may not be dialled, or None when it may."""
    try:
        ip = _unwrap(ipaddress.ip_address(address))
    except ValueError:
        return f"unparsable address {address!r}"
    # never useful to a webhook, and the metadata service hands out credentials; link-local
    # is where such services live (AWS ECS's task credentials at 169.254.170.2, Oracle's at
    # 192.0.0.192 aside), so allow_private (for receivers on a private network) leaves it out
    if ip in METADATA or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        return f"address {ip} is never allowed"
    if allow_private or (ip.is_global and not ip.is_reserved):
        return None
    return f"address {ip} is private, loopback, link-local or reserved"


def check_address(address: str, allow_private: bool) -> None:
    """Raise ``RefusedDestination`` unless ``address`` may be dialled."""
    reason = refusal(address, allow_private)
    if reason:
        raise RefusedDestination(f"destination refused: {reason}")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _legacy_ipv4(host: str) -> bool:
    """A host ``inet_aton`` reads as an address though it is no dotted quad."""
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return False
    return True


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a URL that is not http(s), has no host, or names a forbidden IP literally."""
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        raise RefusedDestination("destination refused: not a URL") from None
    if parsed.scheme not in ("http", "https"):
        raise RefusedDestination("destination refused: the scheme must be http or https")
    if not parsed.host:
        raise RefusedDestination("destination refused: the URL has no host")
    if _is_ip_literal(parsed.host):
        check_address(parsed.host, allow_private)
        return
    if _legacy_ipv4(parsed.host):
        # 2130706433, 127.1, 0177.0.0.1: the C library dials them as 127.0.0.1, while no
        # check here reads them as addresses (aiohttp before 3.14.5 skipped the resolver's)
        raise RefusedDestination("destination refused: the host is an IPv4 address in a"
                                 " legacy form; write it as four decimal parts")
    try:
        # what the name lookup does first: an empty label or one over 63 characters fails
        # there, with an error that is no connection error (and was retried forever)
        parsed.host.encode("idna")
    except UnicodeError:
        raise RefusedDestination("destination refused: the host is not a valid name") from None


def destination(url: str) -> str:
    """The host:port a delivery goes to (the unit of per-destination limits)."""
    try:
        parsed = URL(url)
        return f"{parsed.host}:{parsed.port}"
    except (TypeError, ValueError):
        return url


#: the threads a resolver looks names up on, unless told (the relay: one per attempt slot)
LOOKUP_THREADS = 4


class GuardedResolver(AbstractResolver):
    """A resolver that refuses a name if any of its addresses is forbidden."""

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None,
                 threads: int = LOOKUP_THREADS) -> None:
        self.allow_private = allow_private
        self._lookups = None if inner else _OwnLookups(threads)
        # ThreadedResolver calls its loop's getaddrinfo and getnameinfo, and nothing else
        self._inner = inner or ThreadedResolver(self._lookups)  # type: ignore[arg-type]

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """Resolve ``host``; refuse it outright when one address is forbidden."""
        # all or nothing: a name that mixes public and private addresses is an attack, not a
        # misconfiguration to route around
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            check_address(info["host"].partition("%")[0], self.allow_private)
        return infos

    async def close(self) -> None:
        """Release the inner resolver."""
        await self._inner.close()
        if self._lookups is not None:
            self._lookups.close()


class _OwnLookups:
    """``getaddrinfo`` and ``getnameinfo`` on threads of the relay's own. On the loop's
    default executor, a user's callback_url on a name whose server never answers held a
    thread for the C library's whole timeout (the relay's timeout cancels the wait, not the
    lookup): a few such deliveries took every thread, and the lookups of Letta's host and
    the checkpointer's syncs, which share them, waited."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tracker-relay-dns")

    async def getaddrinfo(self, host: str, port: int, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, socket.getaddrinfo, host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr: tuple, flags: int = 0) -> tuple[str, str]:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, socket.getnameinfo, sockaddr, flags)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
