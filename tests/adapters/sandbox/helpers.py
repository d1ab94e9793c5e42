"""Test parts for the sandbox suites: a git workspace, a local HTTP origin, and a resolver/dialer
that make allowed names lead to that origin on 127.0.0.1 — never to outside addresses."""

from __future__ import annotations

import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Public-looking addresses so the proxy's address check runs for real; `dial` maps them to the
# local origin, so nothing is ever sent to them.
PUBLIC_A = "93.184.215.14"
PUBLIC_B = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"

NAMES = {
    "allowed.example.org": [PUBLIC_A],
    "a.wild.example.org": [PUBLIC_A],
    "a.b.wild.example.org": [PUBLIC_A],
    "wild.example.org": [PUBLIC_A],
    "evilwild.example.org": [PUBLIC_A],
    "sub.allowed.example.org": [PUBLIC_A],
    "a.wild.example.org.evil.com": [PUBLIC_A],
    "v6.wild.example.org": [PUBLIC_B],
    "loopback.wild.example.org": ["127.0.0.1"],
    "metadata.wild.example.org": ["169.254.169.254"],
    "private.wild.example.org": ["10.1.2.3"],
    "mapped.wild.example.org": ["::ffff:127.0.0.1"],
    "mixed.wild.example.org": [PUBLIC_A, "192.168.1.1"],
    "setup-registry.example.org": [PUBLIC_A],
}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "t@example.invalid")
    git(path, "config", "user.name", "T")
    (path / "README.md").write_text("hello\n")
    (path / "src").mkdir()
    (path / "src" / "app.py").write_text("print('v1')\n")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "init")
    return git(path, "rev-parse", "HEAD")


class Origin:
    """A plain HTTP server on 127.0.0.1 standing in for every allowed internet host."""

    def __init__(self, big: bytes = b"") -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                origin.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                data = big if self.path == "/big" else f"hello {self.command} {self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Network:
    """resolver + dial for the proxy. Records every dial so tests can prove denials never connect."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.dialed: list[tuple[str, int]] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        try:
            return list(NAMES[host])
        except KeyError:
            raise OSError(f"test resolver: unknown name {host}") from None

    def dial(self, address: str, port: int) -> tuple[str, int]:
        self.dialed.append((address, port))
        if address not in (PUBLIC_A, PUBLIC_B):
            raise AssertionError(f"proxy tried to dial {address}: must have been refused before connecting")
        return ("127.0.0.1", self.origin.port)


PROBE = r'''
import json, socket, sys
def ask(raw, port=3128):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(raw)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if raw.startswith(b"CONNECT") and b"\r\n\r\n" in data:
                break
    except socket.timeout:
        pass
    s.close()
    return data
out = {}
for target in json.loads(sys.argv[1]):
    data = ask(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
    out[target] = data.split(b"\r\n", 1)[0].decode(errors="replace")
print(json.dumps(out))
'''
