"""Escape and abuse suite: each case runs for real in the local sandbox and asserts that it fails
AND that the host is unharmed. Allowed names resolve (test resolver) to public-looking addresses
that `dial` maps to a local origin; denied requests must never dial at all."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from adapters.sandbox.base import Outcome, SandboxSpec
from adapters.sandbox.cgroups import Cgroup
from adapters.sandbox.output import printable
from tests.adapters.sandbox.conftest import needs_bwrap
from tests.adapters.sandbox.helpers import PROBE

pytestmark = needs_bwrap

ALLOW = ["allowed.example.org", "*.wild.example.org"]


def spec(ws: Path, script: str, **kw) -> SandboxSpec:
    values = dict(memory_mb=128, pids=64, wall_clock_s=10, tmp_mb=16, disk_mb=64)
    values.update(kw)
    return SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", script], **values)


def py(ws: Path, code: str, **kw) -> SandboxSpec:
    return spec(ws, 'exec python3 -c "$CODE"', env={"CODE": code}, **kw)


def cgroups_here() -> bool:
    probe = Cgroup.create("probe-" + str(os.getpid()))
    if probe is None:
        return False
    probe.destroy()
    return True


# ---- filesystem ----------------------------------------------------------------------------


async def test_writes_outside_workspace_fail(sandbox, repo, tmp_path) -> None:
    ws, _ = repo
    canary = tmp_path / "outside.txt"
    canary.write_text("original")
    script = (
        f"for p in /usr/evil /etc/evil /evil /root/evil /proc/sys/kernel/core_pattern /proc/sys/kernel/hostname"
        f" /proc/sys/vm/swappiness /proc/sysrq-trigger /var/evil {canary}; do"
        "  (echo pwned > $p) 2>/dev/null && echo WROTE:$p; done;"
        "mount -o remount,rw / 2>/dev/null && echo REMOUNTED; mount -o remount,rw /usr 2>/dev/null && echo REMOUNTED;"
        "unshare -r true 2>/dev/null && echo USERNS; echo end"
    )
    result = await sandbox.run(spec(ws, script))
    assert b"WROTE" not in result.output and b"REMOUNTED" not in result.output and b"USERNS" not in result.output
    assert result.output.endswith(b"end\n")
    assert canary.read_text() == "original"
    assert not Path("/usr/evil").exists() and not Path("/etc/evil").exists() and not Path("/evil").exists()


async def test_symlink_out_of_workspace(sandbox, repo, tmp_path) -> None:
    ws, _ = repo
    canary = tmp_path / "target.txt"
    canary.write_text("original")
    (ws / "prelink").symlink_to(canary)  # planted before the run: resolves inside the sandbox, not on the host
    script = (
        "echo pwned > prelink 2>/dev/null && echo WROTE1; ln -s /etc/passwd p; echo x >> p 2>/dev/null && echo WROTE2;"
        "ln -s /usr/bin/env e; echo x > e 2>/dev/null && echo WROTE3; echo end"
    )
    result = await sandbox.run(spec(ws, script))
    assert b"WROTE" not in result.output and b"end" in result.output
    assert canary.read_text() == "original"


@pytest.mark.parametrize("what", [".git", ".git/hooks", ".git/config"])
async def test_symlinked_git_paths_are_refused(sandbox, repo, tmp_path, what) -> None:
    ws, _ = repo
    target = tmp_path / "elsewhere"
    shutil.move(str(ws / what), str(target))
    (ws / what).symlink_to(target)
    result = await sandbox.run(spec(ws, "touch RAN"))
    assert result.outcome == Outcome.refused and "symlink" in result.detail
    assert not (ws / "RAN").exists()


async def test_git_hooks_and_config_read_only(sandbox, repo) -> None:
    ws, _ = repo
    before = (ws / ".git" / "config").read_text()
    script = (
        "echo 'touch /workspace/PWNED' > .git/hooks/post-checkout 2>/dev/null && echo W1;"
        "echo '[core]\nfsmonitor = touch /workspace/PWNED' >> .git/config 2>/dev/null && echo W2;"
        "rm -rf .git/hooks 2>/dev/null; mv .git/hooks .git/h2 2>/dev/null && echo W3;"
        "mv .git/config .git/c2 2>/dev/null && echo W4; ls .git/hooks >/dev/null && echo end"
    )
    result = await sandbox.run(spec(ws, script))
    assert result.output.strip().endswith(b"end") and b"W" not in result.output.replace(b"end", b"")
    assert (ws / ".git" / "config").read_text() == before
    assert not (ws / ".git" / "hooks" / "post-checkout").exists() and (ws / ".git" / "hooks").is_dir()


async def test_host_secrets_and_environment_invisible(sandbox, repo) -> None:
    ws, _ = repo
    os.environ["CONVEYOR_CANARY_SECRET"] = "canary-7f3a9"
    try:
        script = (
            "ls /root 2>/dev/null && echo SAW-ROOT; cat /etc/shadow 2>/dev/null && echo SAW-SHADOW;"
            "ls /etc/ssh 2>/dev/null && echo SAW-SSH; ls /home /work /srv 2>/dev/null && echo SAW-HOST;"
            "cat /proc/1/environ /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; env; echo end"
        )
        result = await sandbox.run(spec(ws, script))
    finally:
        del os.environ["CONVEYOR_CANARY_SECRET"]
    assert b"SAW-" not in result.output and b"end" in result.output
    assert b"canary-7f3a9" not in result.output


async def test_host_pids_invisible(sandbox, repo) -> None:
    ws, _ = repo
    script = (
        "for p in /proc/[0-9]*; do printf '%s ' $(cat $p/comm); done; echo; ls -d /proc/[0-9]* | wc -l;"
        f"kill -0 {os.getpid()} 2>/dev/null && echo SIGNALLED; kill -9 -1 2>/dev/null; echo end"
    )
    result = await sandbox.run(spec(ws, script))
    text = result.output.decode()
    lines = text.strip().splitlines()
    assert set(lines[0].split()) <= {"bwrap", "sh", "cat", "ls", "wc"}, lines[0]
    assert int(lines[1]) <= 5 and "SIGNALLED" not in text
    assert os.getppid() > 0  # we are alive: kill -1 reached nothing outside


async def test_tiocsti_has_no_terminal(sandbox, repo) -> None:
    ws, _ = repo
    code = (
        "import fcntl, termios, os\n"
        "for what in ('fd0', '/dev/tty'):\n"
        "    try:\n"
        "        fd = 0 if what == 'fd0' else os.open('/dev/tty', os.O_RDWR)\n"
        "        fcntl.ioctl(fd, termios.TIOCSTI, b'x'); print('INJECTED', what)\n"
        "    except OSError as e: print('blocked', what, e.errno)\n"
        "print('sid', os.getsid(0) == os.getpid() or os.getsid(0))"
    )
    result = await sandbox.run(py(ws, code))
    assert b"INJECTED" not in result.output and result.output.count(b"blocked") == 2


# ---- limits --------------------------------------------------------------------------------


async def test_fork_bomb(sandbox, repo) -> None:
    if not cgroups_here():
        pytest.skip("no cgroups: the pids cap needs a pids cgroup")
    ws, _ = repo
    started = time.monotonic()
    # the shell stays alive, so the run can only end early through the pids cap
    result = await sandbox.run(spec(ws, "b() { b | b & }; b; sleep 4", pids=32, wall_clock_s=5))
    assert result.outcome == Outcome.pids, result
    assert time.monotonic() - started < 4


async def test_memory_bomb(sandbox, repo) -> None:
    if not cgroups_here():
        pytest.skip("no cgroups: the memory outcome needs a memory cgroup")
    ws, _ = repo
    result = await sandbox.run(py(ws, "x = bytearray(512 << 20); print('ALLOCATED')", memory_mb=64))
    assert result.outcome == Outcome.memory, result
    assert b"ALLOCATED" not in result.output


async def test_cpu_spin_past_wall_clock(sandbox, repo) -> None:
    ws, _ = repo
    started = time.monotonic()
    result = await sandbox.run(spec(ws, "while :; do :; done", wall_clock_s=1))
    assert result.outcome == Outcome.timeout and time.monotonic() - started < 3


async def test_sigterm_ignored_and_daemons_killed(sandbox, repo) -> None:
    ws, _ = repo
    script = (
        "(trap '' TERM; setsid sh -c \"trap '' TERM; sleep 1.5; echo pwned > /workspace/DAEMON1\" &) ;"
        "trap '' TERM; while :; do sleep 0.05; done"
    )
    started = time.monotonic()
    result = await sandbox.run(spec(ws, script, wall_clock_s=1))
    assert result.outcome == Outcome.timeout and time.monotonic() - started < 3
    time.sleep(0.8)
    assert not (ws / "DAEMON1").exists()


async def test_double_forked_daemon_does_not_outlive_run(sandbox, repo) -> None:
    ws, _ = repo
    script = "(setsid sh -c 'sleep 0.4; echo pwned > /workspace/DAEMON2' </dev/null >/dev/null 2>&1 &); echo started"
    result = await sandbox.run(spec(ws, script))
    assert result.outcome == Outcome.ok
    time.sleep(0.8)
    assert not (ws / "DAEMON2").exists()


async def test_fill_workspace_disk(sandbox, repo) -> None:
    ws, _ = repo
    script = "i=0; while :; do head -c 1048576 /dev/zero > fill$i || exit 1; i=$((i+1)); done"
    result = await sandbox.run(spec(ws, script, disk_mb=16, wall_clock_s=10))
    assert result.outcome == Outcome.disk, result
    written = sum(p.stat().st_size for p in ws.glob("fill*"))
    assert written < 2 * 1024 * 1024 * 1024  # polled cap: stopped within one scan interval


async def test_single_file_size_cap(sandbox, repo) -> None:
    ws, _ = repo
    result = await sandbox.run(spec(ws, "head -c 100000000 /dev/zero > big", disk_mb=8))
    assert result.outcome == Outcome.disk and (ws / "big").stat().st_size <= 8 * 1024 * 1024


async def test_fill_inodes(sandbox, repo) -> None:
    ws, _ = repo
    code = "import os\nos.mkdir('many')\nfor i in range(1000000): open(f'many/{i}', 'w').close()"
    result = await sandbox.run(py(ws, code, inodes=600, wall_clock_s=10))
    assert result.outcome == Outcome.disk, result
    assert len(os.listdir(ws / "many")) < 1_000_000


async def test_fill_tmp(sandbox, repo) -> None:
    ws, _ = repo
    result = await sandbox.run(spec(ws, "head -c 64000000 /dev/zero > /tmp/x || { sleep 0.4; exit 1; }", tmp_mb=4))
    assert result.outcome == Outcome.disk, result


async def test_one_gigabyte_of_stdout(sandbox, repo) -> None:
    ws, _ = repo
    started = time.monotonic()
    result = await sandbox.run(spec(ws, "head -c 1000000000 /dev/zero", output_cap_bytes=1 << 20))
    assert result.outcome == Outcome.output_cap and result.output_truncated
    assert result.output.startswith(b"\0" * (1 << 20)) and result.output.endswith(b"truncated at 1048576 bytes]\n")
    assert time.monotonic() - started < 5


async def test_invalid_utf8_and_ansi_escapes(sandbox, repo) -> None:
    ws, _ = repo
    result = await sandbox.run(spec(ws, "printf 'ok \\377\\376 \\033[31mred\\033[0m \\033]0;title\\007 \\033[2J end'"))
    assert b"\xff\xfe" in result.output and b"\x1b[31m" in result.output  # raw bytes kept for the transcript
    shown = printable(result.output)
    assert "\x1b" not in shown and "\x07" not in shown and "\ufffd" in shown and "red" in shown and shown.endswith("end")


# ---- network -------------------------------------------------------------------------------


async def test_direct_tcp_udp_and_dns_fail(sandbox, repo, origin, network) -> None:
    ws, _ = repo
    code = (
        "import socket\n"
        "def t(label, f):\n"
        "    try: f(); print('OPEN', label)\n"
        "    except OSError as e: print('blocked', label, type(e).__name__)\n"
        f"t('host-loopback-service', lambda: socket.create_connection(('127.0.0.1', {origin.port}), timeout=1))\n"
        "t('tcp-ip', lambda: socket.create_connection(('192.0.2.1', 443), timeout=1))\n"
        "t('udp-ip', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.1', 53)))\n"
        "t('dns', lambda: socket.getaddrinfo('allowed.example.org', 443))\n"
        "print(open('/proc/net/dev').read().count(':'))\n"
    )
    result = await sandbox.run(py(ws, code, allow_domains=ALLOW))
    text = result.output.decode()
    assert "OPEN" not in text and text.count("blocked") == 4, text
    assert text.strip().splitlines()[-1] == "1"  # only the loopback interface
    assert len(origin.requests) == 0 or all(r[1] != "/" for r in origin.requests)
    assert network.dialed == []


async def test_noproxy_client_cannot_get_out(sandbox, repo, network) -> None:
    ws, _ = repo
    if shutil.which("curl"):
        script = "curl -sS -m 2 --noproxy '*' http://allowed.example.org:443/ && echo GOT; echo end"
    else:
        script = "python3 -c \"import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://allowed.example.org:443/', timeout=2)\" && echo GOT; echo end"
    result = await sandbox.run(spec(ws, script, allow_domains=ALLOW))
    assert b"GOT" not in result.output and network.dialed == []


async def test_proxy_refusals(sandbox, repo, network) -> None:
    ws, _ = repo
    denied = [
        "127.0.0.1:443", "2130706433:443", "0x7f000001:443", "0177.0.0.1:443", "127.1:443", "[::1]:443",
        "[::ffff:127.0.0.1]:443", "[::ffff:7f00:1]:443", "169.254.169.254:443", "93.184.215.14:443",
        "loopback.wild.example.org:443", "metadata.wild.example.org:443", "private.wild.example.org:443",
        "mapped.wild.example.org:443", "mixed.wild.example.org:443",
        "allowed.example.org:22", "a.wild.example.org:80",
        "wild.example.org:443", "evilwild.example.org:443", "sub.allowed.example.org:443",
        "a.wild.example.org.evil.com:443", "xn--wild-9ta.example.org:443", "unknown.wild.example.org:443",
    ]
    allowed = ["allowed.example.org:443", "A.WILD.EXAMPLE.ORG:443", "a.b.wild.example.org.:443", "v6.wild.example.org:443"]
    result = await sandbox.run(
        spec(ws, 'python3 /run/conveyor/probe.py "$T"', inputs={"probe.py": PROBE}, env={"T": json.dumps(denied + allowed)},
             allow_domains=ALLOW)
    )
    answers = json.loads(result.output)
    for target in denied:
        assert answers[target].startswith("HTTP/1.1 403"), (target, answers[target])
    for target in allowed:
        assert answers[target] == "HTTP/1.1 200 Connection Established", (target, answers[target])
    assert len(network.dialed) == len(allowed)  # every denial happened before any connect
    deny_lines = [line for line in result.egress if line.startswith("deny")]
    assert len(deny_lines) == len(denied)
    assert any("169.254.169.254: link-local" in line for line in deny_lines)
    assert any("IP literal" in line for line in deny_lines) and any("port 22 not allowed" in line for line in deny_lines)


async def test_plain_http_ip_literals_and_malformed_requests(sandbox, repo, network) -> None:
    ws, _ = repo
    code = r'''
import socket
def ask(raw):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=5); s.sendall(raw)
    data = s.recv(200); s.close(); return data.split(b"\r\n", 1)[0].decode(errors="replace")
for raw in [
    b"GET http://127.0.0.1/ HTTP/1.1\r\n\r\n", b"GET http://[::1]:443/ HTTP/1.1\r\n\r\n",
    b"GET http://user:pw@allowed.example.org:443/ HTTP/1.1\r\n\r\n", b"GET /relative HTTP/1.1\r\nHost: allowed.example.org\r\n\r\n",
    b"GET https://allowed.example.org/ HTTP/1.1\r\n\r\n", b"CONNECT\r\n\r\n", b"CONNECT allowed.example.org HTTP/1.1\r\n\r\n",
    b"CONNECT allowed.example.org:99999 HTTP/1.1\r\n\r\n", b"CONNECT allowed.example.org:443 HTTP/1.1 extra\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"GARBAGE\r\n\r\n", b"CONNECT a:1 HTTP/1.1\r\nX: " + b"A" * 70000 + b"\r\n\r\n",
]:
    print(ask(raw))
print(ask(b"GET http://allowed.example.org:443/after HTTP/1.1\r\n\r\n"))
'''
    result = await sandbox.run(py(ws, code, allow_domains=ALLOW, allow_ports=[443]))
    lines = result.output.decode().strip().splitlines()
    assert len(lines) == 13, lines
    assert all(line.startswith(("HTTP/1.1 403", "HTTP/1.1 400", "HTTP/1.1 431")) for line in lines[:-1]), lines
    assert lines[-1] == "HTTP/1.1 200 OK"  # the proxy survived all of it
    assert network.dialed == [("93.184.215.14", 443)]


async def test_seccomp_denies_kernel_surfaces(sandbox, repo, network) -> None:
    from adapters.sandbox import seccomp
    from adapters.sandbox.bubblewrap import BubblewrapSandbox

    if not seccomp.supported():
        pytest.skip("the seccomp filter is built for x86_64 only")
    ws, _ = repo
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, nr in [('keyctl', 250), ('io_uring_setup', 425), ('perf_event_open', 298), ('getpid', 39)]:\n"
        "    r = libc.syscall(nr, 0, 0, 0, 0, 0); print(name, 'EPERM' if r < 0 and ctypes.get_errno() == 1 else 'other')\n"
        "print('nnp', open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0])\n"
    )
    filtered = (await sandbox.run(py(ws, code))).output.decode().split()
    assert filtered == ["keyctl", "EPERM", "io_uring_setup", "EPERM", "perf_event_open", "EPERM", "getpid", "other", "nnp", "1"]
    # the same probe without the filter gets the kernel's own answers: the filter is what denies
    plain = await BubblewrapSandbox(use_seccomp=False).run(py(ws, code))
    assert "keyctl other" in plain.output.decode() and "io_uring_setup other" in plain.output.decode()
