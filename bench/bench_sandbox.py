"""Local sandbox costs, measured against baselines in the same process:
  1. start overhead: a no-op command in the full local sandbox (namespaces, cgroup, rlimits, and
     with an allowlist the egress listener in the sandbox's netns) vs a bare subprocess;
  2. proxy throughput: an allowed download through the egress proxy (CONNECT tunnel) from a
     local origin on 127.0.0.1 vs the same download without the sandbox and proxy.
Goal: under 25 ms added per run.

    python bench/bench_sandbox.py
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.sandbox.base import Outcome, SandboxSpec  # noqa: E402
from adapters.sandbox.bubblewrap import BubblewrapSandbox  # noqa: E402
from tests.adapters.sandbox.helpers import Network, Origin, make_repo  # noqa: E402

RUNS = 40
DOWNLOAD_MB = 64

DOWNLOAD = r'''
import socket, sys, time
s = socket.create_connection(("127.0.0.1", 3128))
s.sendall(b"CONNECT allowed.example.org:443 HTTP/1.1\r\n\r\n")
assert s.recv(100).startswith(b"HTTP/1.1 200")
started = time.perf_counter()
s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
total = 0
while chunk := s.recv(1 << 20):
    total += len(chunk)
print(total, time.perf_counter() - started)
'''


def ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:6.2f} ms  p90 {sorted(samples)[int(len(samples) * 0.9)] * 1000:6.2f} ms"


async def main() -> None:
    sandbox = BubblewrapSandbox()
    reason = sandbox.available()
    if reason:
        print(f"bench_sandbox: skipped ({reason})")
        return
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    ws = tmp / "ws"
    make_repo(ws)

    bare: list[float] = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        bare.append(time.perf_counter() - started)

    async def timed(spec: SandboxSpec, sb: BubblewrapSandbox = sandbox) -> list[float]:
        out = []
        await sb.run(spec)  # warm
        for _ in range(RUNS):
            started = time.perf_counter()
            result = await sb.run(spec)
            out.append(time.perf_counter() - started)
            assert result.outcome == Outcome.ok, result
        return out

    plain = await timed(SandboxSpec(workspace=ws, argv=["/bin/true"]))
    origin = Origin(big=b"x" * (DOWNLOAD_MB << 20))
    network = Network(origin)
    netsb = BubblewrapSandbox(resolver=network.resolve, dial=network.dial)
    with_net = await timed(SandboxSpec(workspace=ws, argv=["/bin/true"], allow_domains=["allowed.example.org"]), netsb)
    print(f"cgroups in use: {sandbox.cgroups_used}")
    print(f"bare subprocess /bin/true        {ms(bare)}")
    print(f"sandbox no-op (no network)       {ms(plain)}   added {1000 * (statistics.median(plain) - statistics.median(bare)):6.2f} ms")
    print(f"sandbox no-op (egress proxy up)  {ms(with_net)}   added {1000 * (statistics.median(with_net) - statistics.median(bare)):6.2f} ms")

    # throughput: direct from the origin (no sandbox) vs through sandbox + proxy tunnel
    direct_code = DOWNLOAD.replace('("127.0.0.1", 3128)', f'("127.0.0.1", {origin.port})').replace(
        's.sendall(b"CONNECT allowed.example.org:443 HTTP/1.1\\r\\n\\r\\n")\nassert s.recv(100).startswith(b"HTTP/1.1 200")\n', ""
    )
    direct = subprocess.run([sys.executable, "-c", direct_code], capture_output=True, text=True, check=True).stdout.split()
    result = await netsb.run(
        SandboxSpec(workspace=ws, argv=["python3", "-c", DOWNLOAD], allow_domains=["allowed.example.org"], memory_mb=512)
    )
    assert result.outcome == Outcome.ok, result.output
    proxied = result.output.split()
    for label, (size, secs) in (("direct (no sandbox, no proxy)", direct), ("sandbox -> egress proxy", proxied)):
        print(f"download {int(size) >> 20} MB {label:32s} {int(size) / float(secs) / (1 << 20):8.1f} MB/s")
    origin.close()
    subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    asyncio.run(main())
