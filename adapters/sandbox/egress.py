"""Host-side egress proxy: the only way out of a sandbox's network namespace.

Speaks HTTP CONNECT (for TLS) and absolute-form plain HTTP. Every request is checked against:
  1. the name: a DNS name (IP literals in any spelling are refused) matching the allowlist
     (exact names and `*.example.com` wildcards, which match subdomains only);
  2. the port: one of the allowed ports;
  3. the addresses: the proxy resolves the name itself and refuses if ANY address is loopback,
     private, link-local (cloud metadata 169.254.169.254), shared, multicast, reserved or otherwise
     not globally routable — so an allowed name re-pointed at internal space (DNS rebinding) is
     refused before any connection is attempted, and the connection goes to the checked address.
Every decision is appended to `decisions` (bounded) for the audit trail.

`resolver` and `dial` exist for tests: the resolver maps names to addresses (public-looking ones,
so the address check runs for real) and `dial` translates a checked (address, port) to the local
test server it stands for. Neither changes what is allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

Resolver = Callable[[str, int], Awaitable[list[str]]]
Dialer = Callable[[str, int], tuple[str, int]]

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MAX_DECISIONS = 1000
MAX_CONNECTIONS = 256
"""Concurrent connections per run: a flood from the sandbox must not exhaust the worker."""

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HOP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive", "host", "te", "upgrade"}


class Denied(Exception):
    """A request the policy refuses; the message is the reason that goes in the audit line."""


def normalize_host(raw: str) -> str:
    """Lowercase, one trailing dot removed; refuses IP literals and anything not a plain DNS name."""
    host = raw.strip()
    if host.startswith("[") or ":" in host:
        raise Denied("IP literal refused")
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253:
        raise Denied("not a host name")
    if not host.isascii():
        raise Denied("non-ASCII host name refused (use the punycode form in the allowlist)")
    # inet_aton accepts every legacy IPv4 spelling: 2130706433, 0x7f000001, 0177.0.0.1, 127.1
    try:
        socket.inet_aton(host)
        raise Denied("IP literal refused")
    except OSError:
        pass
    try:
        ipaddress.ip_address(host)
        raise Denied("IP literal refused")
    except ValueError:
        pass
    labels = host.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise Denied("not a host name")
    if len(labels) < 2 or labels[-1].isdigit() or re.fullmatch(r"0x[0-9a-f]*", labels[-1]):
        raise Denied("IP literal refused" if labels[-1][:1].isdigit() else "not a fully qualified host name")
    return host


def domain_allowed(host: str, patterns: list[str]) -> bool:
    """`host` is normalized. `x.com` matches only x.com; `*.x.com` matches a.x.com, a.b.x.com, not x.com."""
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def address_refusal(address: str) -> str | None:
    """Why an address may not be dialled, or None when it is globally routable unicast."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if mapped is not None:
            return address_refusal(str(mapped)) or ("IPv4-embedding IPv6 address refused")
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address (cloud metadata)"
    if ip.is_private:
        return "private address"
    if ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return "special address"
    if not ip.is_global:
        return "non-global address"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class EgressProxy:
    def __init__(
        self,
        allow_domains: list[str],
        allow_ports: list[int],
        *,
        resolver: Resolver | None = None,
        dial: Dialer | None = None,
        decisions: list[str] | None = None,
    ) -> None:
        self.allow_domains = [d.lower().rstrip(".") for d in allow_domains]
        self.allow_ports = set(allow_ports)
        self.resolver = resolver or system_resolver
        self.dial = dial
        self.decisions = decisions if decisions is not None else []
        self._dropped = 0
        self._tasks: set[asyncio.Task] = set()
        self.connects = 0
        """How many upstream connections were attempted (tests assert denials never dial)."""

    def _log(self, line: str) -> None:
        if len(self.decisions) < MAX_DECISIONS:
            self.decisions.append(line)
        else:
            self._dropped += 1
            self.decisions[-1] = f"... {self._dropped} more egress decisions not recorded"

    async def check(self, host_raw: str, port: int) -> tuple[str, str]:
        """Policy decision for one destination: returns (host, address to dial) or raises Denied."""
        host = normalize_host(host_raw)
        if not domain_allowed(host, self.allow_domains):
            raise Denied("host not in allowlist")
        if port not in self.allow_ports:
            raise Denied(f"port {port} not allowed")
        try:
            addresses = await asyncio.wait_for(self.resolver(host, port), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise Denied(f"name does not resolve ({exc.__class__.__name__})") from None
        if not addresses:
            raise Denied("name does not resolve")
        for address in addresses:
            try:
                reason = address_refusal(address)
            except ValueError:
                reason = "unparseable address"
            if reason:
                raise Denied(f"resolves to {address}: {reason}")
        return host, addresses[0]

    async def _open(self, address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.connects += 1
        target = self.dial(address, port) if self.dial else (address, port)
        return await asyncio.wait_for(asyncio.open_connection(*target), CONNECT_TIMEOUT_S)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= MAX_CONNECTIONS:
            self._log(f"deny connection: more than {MAX_CONNECTIONS} concurrent connections")
            _close(writer)
            return
        task = asyncio.current_task()
        if task:
            self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            if task:
                self._tasks.discard(task)
            _close(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            self._log("deny malformed request (no complete request head)")
            await _reply(writer, 400, "Bad Request")
            return
        if len(head) > MAX_HEAD:
            self._log("deny malformed request (head too large)")
            await _reply(writer, 431, "Request Header Fields Too Large")
            return
        try:
            text = head.decode("ascii")
            request_line, *header_lines = text[:-4].split("\r\n")
            method, target, version = request_line.split(" ")
            if not version.startswith("HTTP/1.") or not method.isalpha():
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            self._log("deny malformed request line")
            await _reply(writer, 400, "Bad Request")
            return
        shown = _printable(f"{method} {target}")
        try:
            if method.upper() == "CONNECT":
                host, port = _split_authority(target)
                host, address = await self.check(host, port)
                upstream = await self._open(address, port)
                self._log(f"allow {shown} -> {address}")
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await writer.drain()
                await _splice(reader, writer, *upstream)
                return
            url = urlsplit(target)
            if url.scheme.lower() != "http" or not url.hostname or url.username or url.password:
                raise Denied("only absolute http:// URLs without credentials (or CONNECT) are proxied")
            host_part = url.netloc.rsplit(":", 1) if not url.netloc.endswith("]") else [url.netloc]
            port = int(host_part[1]) if len(host_part) == 2 and host_part[1] else 80
            host, address = await self.check(host_part[0], port)
            headers = [line for line in header_lines if line.split(":", 1)[0].strip().lower() not in _HOP_HEADERS]
            path = url.path or "/"
            if url.query:
                path += "?" + url.query
            new_head = "\r\n".join(
                [f"{method} {path} {version}", f"Host: {host}" + (f":{port}" if port != 80 else ""), *headers, "Connection: close"]
            )
            up_reader, up_writer = await self._open(address, port)
            self._log(f"allow {shown} -> {address}")
            up_writer.write(new_head.encode() + b"\r\n\r\n")
            await _splice(reader, writer, up_reader, up_writer)
        except Denied as exc:
            self._log(f"deny {shown}: {exc}")
            await _reply(writer, 403, "Forbidden", f"conveyor egress policy: {exc}\n")
        except (ValueError, UnicodeError):
            self._log(f"deny {shown}: malformed target")
            await _reply(writer, 400, "Bad Request")
        except (OSError, asyncio.TimeoutError) as exc:
            self._log(f"fail {shown}: upstream unreachable ({exc.__class__.__name__})")
            await _reply(writer, 502, "Bad Gateway")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _split_authority(target: str) -> tuple[str, int]:
    if target.startswith("["):
        raise Denied("IP literal refused")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError("CONNECT target must be host:port")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError("port out of range")
    return host, number


def _printable(text: str, limit: int = 200) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)[:limit]


async def _reply(writer: asyncio.StreamWriter, code: int, reason: str, body: str = "") -> None:
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
        f"Connection: close\r\n\r\n".encode() + data
    )
    try:
        await writer.drain()
    except ConnectionError:
        pass


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(65536):
            dst.write(chunk)
            await dst.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            if dst.can_write_eof():
                dst.write_eof()
        except (OSError, RuntimeError):
            pass


async def _splice(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
) -> None:
    try:
        await asyncio.gather(_pump(client_r, up_w), _pump(up_r, client_w))
    finally:
        _close(up_w)


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except Exception:  # already closed / loop shutting down
        pass
