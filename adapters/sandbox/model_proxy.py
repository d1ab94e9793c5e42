"""Host-side credential endpoints: model APIs reached from a sandbox without the key inside it.

The sandbox talks plain HTTP to http://127.0.0.1:<port> (a listener the host places in the
sandbox's network namespace); this side drops any auth header the sandbox sent, adds the real
key read from the worker's environment, and forwards to the upstream over TLS. The key exists
only in the worker process: never in the sandbox's argv, environment or files.

For the agent's environment use `credential_env(secrets)`, e.g.
    {"ANTHROPIC_BASE_URL": "http://127.0.0.1:3129", "ANTHROPIC_API_KEY": "conveyor-proxied"}
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel

from adapters.sandbox.egress import HEAD_TIMEOUT_S, MAX_HEAD, _close, _printable, _reply, _splice

PLACEHOLDER_KEY = "conveyor-proxied"
"""What the sandbox sees as its API key: a placeholder the proxy replaces."""


class CredentialEndpoint(BaseModel):
    secret: str
    """Name of the worker environment variable holding the key (e.g. ANTHROPIC_API_KEY)."""
    port: int
    """In-sandbox port on 127.0.0.1."""
    upstream_env: str
    """Worker env var that may override the upstream base URL (emulators, gateways)."""
    default_upstream: str
    header: str
    prefix: str = ""
    base_url_env: str
    """The variable the agent reads its base URL from."""
    base_path: str = ""

    @property
    def sandbox_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    def upstream(self, environ: Mapping[str, str]) -> str:
        return (environ.get(self.upstream_env) or self.default_upstream).rstrip("/")


ENDPOINTS: dict[str, CredentialEndpoint] = {
    "ANTHROPIC_API_KEY": CredentialEndpoint(
        secret="ANTHROPIC_API_KEY",
        port=3129,
        upstream_env="CONVEYOR_ANTHROPIC_UPSTREAM",
        default_upstream="https://api.anthropic.com",
        header="x-api-key",
        base_url_env="ANTHROPIC_BASE_URL",
    ),
    "OPENAI_API_KEY": CredentialEndpoint(
        secret="OPENAI_API_KEY",
        port=3130,
        upstream_env="CONVEYOR_OPENAI_UPSTREAM",
        default_upstream="https://api.openai.com",
        header="authorization",
        prefix="Bearer ",
        base_url_env="OPENAI_BASE_URL",
        base_path="/v1",
    ),
}

_STRIP = {"x-api-key", "authorization", "proxy-authorization", "host", "connection", "keep-alive", "proxy-connection"}


def endpoint_for(secret: str) -> CredentialEndpoint:
    try:
        return ENDPOINTS[secret]
    except KeyError:
        known = ", ".join(sorted(ENDPOINTS))
        raise KeyError(f"secret {secret!r} has no host-side credential endpoint (known: {known})") from None


def credential_env(secrets: list[str]) -> dict[str, str]:
    """The environment an agent needs to reach the credential endpoints for `secrets`."""
    env: dict[str, str] = {}
    for secret in secrets:
        endpoint = endpoint_for(secret)
        env[endpoint.base_url_env] = endpoint.sandbox_base_url
        env[endpoint.secret] = PLACEHOLDER_KEY
    return env


def sandbox_base_url(secret: str = "ANTHROPIC_API_KEY") -> str:
    return endpoint_for(secret).sandbox_base_url


class ModelProxy:
    """One credential endpoint for one run. `handle` serves a connection from inside the sandbox."""

    def __init__(self, endpoint: CredentialEndpoint, key: str, upstream: str, decisions: list[str]) -> None:
        if not key:
            raise ValueError(f"{endpoint.secret} is not set in the worker environment")
        self.endpoint = endpoint
        self._key = key
        url = urlsplit(upstream)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"upstream for {endpoint.secret} must be an http(s) URL, got {upstream!r}")
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._prefix = url.path.rstrip("/")
        self.decisions = decisions

    @classmethod
    def from_environ(cls, secret: str, environ: Mapping[str, str], decisions: list[str]) -> "ModelProxy":
        endpoint = endpoint_for(secret)
        return cls(endpoint, environ.get(secret, ""), endpoint.upstream(environ), decisions)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
                if len(head) > MAX_HEAD:
                    raise ValueError
                request_line, *header_lines = head.decode("latin-1")[:-4].split("\r\n")
                method, target, version = request_line.split(" ")
                if not target.startswith("/") or not version.startswith("HTTP/1."):
                    raise ValueError
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                await _reply(writer, 400, "Bad Request")
                return
            headers = [h for h in header_lines if h.split(":", 1)[0].strip().lower() not in _STRIP]
            hostport = self._host if self._port in (80, 443) else f"{self._host}:{self._port}"
            headers += [
                f"Host: {hostport}",
                f"{self.endpoint.header}: {self.endpoint.prefix}{self._key}",
                "Connection: close",
            ]
            new_head = "\r\n".join([f"{method} {self._prefix}{target} {version}", *headers]) + "\r\n\r\n"
            try:
                tls = ssl.create_default_context() if self._scheme == "https" else None
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(self._host, self._port, ssl=tls, server_hostname=self._host if tls else None),
                    10.0,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                self.decisions.append(f"fail model {self.endpoint.secret}: upstream unreachable ({exc.__class__.__name__})")
                await _reply(writer, 502, "Bad Gateway")
                return
            self.decisions.append(f"allow model {self.endpoint.secret} {_printable(method)} {_printable(target, 120)}")
            up_w.write(new_head.encode("latin-1"))
            await _splice(reader, writer, up_r, up_w)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            _close(writer)


def worker_environ() -> Mapping[str, str]:
    return os.environ
