"""The local bubblewrap backend doing its job: outputs, inputs/outbox, stdin, jobs and patches,
egress through the proxy, and refusing (never running unsandboxed) when isolation is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import adapters.sandbox.bubblewrap as bubblewrap
from adapters.sandbox import get_sandbox
from adapters.sandbox.base import Outcome, SandboxJob, SandboxSpec
from adapters.sandbox.bubblewrap import BubblewrapSandbox
from conveyor.config import SandboxPolicy, Settings
from tests.adapters.sandbox.conftest import needs_bwrap
from tests.adapters.sandbox.helpers import git

pytestmark = needs_bwrap


def spec(ws: Path, script: str, **kw) -> SandboxSpec:
    values = dict(memory_mb=256, pids=64, wall_clock_s=10, tmp_mb=16, disk_mb=64)
    values.update(kw)
    return SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", script], **values)


async def test_runs_in_workspace_with_only_given_env(sandbox, repo) -> None:
    ws, _ = repo
    os.environ["CONVEYOR_TEST_WORKER_ONLY"] = "leak"
    try:
        result = await sandbox.run(spec(ws, "pwd; cat README.md; env | sort; echo done >&2; exit 3", env={"FOO": "bar"}))
    finally:
        del os.environ["CONVEYOR_TEST_WORKER_ONLY"]
    text = result.output.decode()
    assert result.outcome == Outcome.exit_nonzero and result.exit_code == 3
    assert "/workspace\nhello\n" in text and "FOO=bar" in text and "done" in text
    assert "CONVEYOR_TEST_WORKER_ONLY" not in text and "HTTP_PROXY" not in text
    assert result.sandbox_id.startswith("lsb-")


async def test_inputs_read_only_outbox_read_back_stdin(sandbox, repo) -> None:
    ws, _ = repo
    script = (
        "cat /run/conveyor/task.md; echo more >> /run/conveyor/task.md && echo WROTE-INPUT;"
        "cat > /run/conveyor/out/summary.md; head -c 100000 /dev/zero > /run/conveyor/out/big;"
        "ln -s /etc/passwd /run/conveyor/out/link"
    )
    result = await sandbox.run(spec(ws, script, inputs={"task.md": "the task\n"}, outbox=True, stdin=b"my summary\n"))
    assert b"the task" in result.output and b"WROTE-INPUT" not in result.output
    assert result.outbox["summary.md"] == "my summary\n"
    assert len(result.outbox["big"]) == 64 * 1024  # capped
    assert "link" not in result.outbox  # symlinks are not followed


async def test_job_patch_computed_inside(sandbox, repo) -> None:
    ws, sha = repo
    script = "echo v2 > src/app.py; printf 'a\\000b' > data.bin; mkdir -p new && echo n > new/file.txt"
    job = SandboxJob(base_sha=sha, agent=spec(ws, script))
    result = await sandbox.run_job(job)
    assert result.agent.outcome == Outcome.ok and result.patch_error == ""
    patch = result.patch.decode()
    assert "+v2" in patch and "new/file.txt" in patch and "GIT binary patch" in patch
    # the patch applies cleanly to a fresh clone of the base
    clone = ws.parent / "check"
    git(ws.parent, "clone", "-q", str(ws), str(clone))
    git(clone, "checkout", "-q", sha)
    (ws.parent / "p.diff").write_bytes(result.patch)
    git(clone, "apply", "--index", str(ws.parent / "p.diff"))
    assert (clone / "data.bin").read_bytes() == b"a\0b"


async def test_patch_cap(sandbox, repo) -> None:
    ws, sha = repo
    job = SandboxJob(base_sha=sha, agent=spec(ws, "seq 1 20000 > big.txt"), max_patch_bytes=4096)
    result = await sandbox.run_job(job)
    assert result.patch == b"" and "max_patch_bytes" in result.patch_error


async def test_patch_step_ignores_hostile_git_config_attempts(sandbox, repo) -> None:
    ws, sha = repo
    # the agent tries to plant an external diff driver and a hook; both are read-only or ignored
    script = (
        "echo '* diff=evil' > .gitattributes; git config diff.evil.command 'touch /workspace/PWNED' || true;"
        "echo 'touch /workspace/PWNED' > .git/hooks/pre-commit || true; echo change >> README.md"
    )
    result = await sandbox.run_job(SandboxJob(base_sha=sha, agent=spec(ws, script)))
    assert not (ws / "PWNED").exists()
    assert "+change" in result.patch.decode()
    assert "diff.evil" not in (ws / ".git" / "config").read_text()


async def test_setup_step_then_agent(sandbox, repo, origin) -> None:
    ws, sha = repo
    policy = SandboxPolicy(
        allow_domains=["allowed.example.org"],
        allow_ports=[443],
        setup_command="python3 -c \"import urllib.request as u; print(u.urlopen('http://setup-registry.example.org:443/pkg').read())\" > installed.txt",
        setup_allow_domains=["setup-registry.example.org"],
        memory_mb=256,
        wall_clock_s=10,
    )
    job = SandboxJob.from_policy(policy, ws, sha, ["/bin/sh", "-c", "cat installed.txt; echo agent >> README.md"])
    assert job.setup is not None and "setup-registry.example.org" in job.setup.allow_domains
    assert "setup-registry.example.org" not in job.agent.allow_domains
    result = await sandbox.run_job(job)
    assert result.setup is not None and result.setup.outcome == Outcome.ok, result.setup.output
    assert b"hello GET /pkg" in result.agent.output
    assert any(line.startswith("allow GET http://setup-registry.example.org:443/pkg") for line in result.setup.egress)


async def test_egress_allowed_connect_and_plain_http(sandbox, repo, network) -> None:
    ws, _ = repo
    script = (
        "python3 - <<'EOF'\n"
        "import urllib.request, socket\n"
        "print(urllib.request.urlopen('http://allowed.example.org:443/plain', timeout=5).read())\n"
        "s = socket.create_connection(('127.0.0.1', 3128)); s.sendall(b'CONNECT a.wild.example.org:443 HTTP/1.1\\r\\n\\r\\n')\n"
        "print(s.recv(100)); s.sendall(b'GET /tunnel HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n')\n"
        "print(s.makefile('rb').read())\n"
        "EOF"
    )
    result = await sandbox.run(spec(ws, script, allow_domains=["allowed.example.org", "*.wild.example.org"]))
    text = result.output.decode()
    assert result.outcome == Outcome.ok, text
    assert "hello GET /plain" in text and "200 Connection Established" in text and "hello GET /tunnel" in text
    assert result.egress == [
        "allow GET http://allowed.example.org:443/plain -> 93.184.215.14",
        "allow CONNECT a.wild.example.org:443 -> 93.184.215.14",
    ]


async def test_no_proxy_and_no_listener_without_allowlist(sandbox, repo) -> None:
    ws, _ = repo
    probe = "import socket\ntry:\n socket.create_connection(('127.0.0.1', 3128), timeout=1); print('OPEN')\nexcept OSError as e: print('CLOSED', e)"
    result = await sandbox.run(spec(ws, "env | grep -i proxy; python3 -c \"$P\"", env={"P": probe}))
    assert b"CLOSED" in result.output and b"HTTP_PROXY" not in result.output


# ---- fail closed ---------------------------------------------------------------------------


async def test_refused_when_bwrap_missing(repo) -> None:
    ws, _ = repo
    result = await BubblewrapSandbox(bwrap="/nonexistent/bwrap").run(spec(ws, "touch RAN"))
    assert result.outcome == Outcome.refused and "not installed" in result.detail
    assert not (ws / "RAN").exists()


async def test_refused_when_namespaces_refused(repo, tmp_path) -> None:
    ws, _ = repo
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = await BubblewrapSandbox(bwrap=str(fake)).run(spec(ws, "touch RAN"))
    assert result.outcome == Outcome.refused and "Operation not permitted" in result.detail
    assert not (ws / "RAN").exists()


async def test_refused_when_proxy_cannot_start(sandbox, repo, monkeypatch) -> None:
    ws, _ = repo

    def broken(pid: int, ports: list[int]):
        raise OSError(1, "setns refused")

    monkeypatch.setattr(bubblewrap, "_listen_in_netns", broken)
    result = await sandbox.run(spec(ws, "touch RAN", allow_domains=["allowed.example.org"]))
    assert result.outcome == Outcome.refused and "setns refused" in result.detail
    assert not (ws / "RAN").exists()


async def test_refused_for_unknown_secret_or_missing_key(repo) -> None:
    ws, _ = repo
    sb = BubblewrapSandbox(environ={})
    result = await sb.run(spec(ws, "touch RAN", secrets=["GITHUB_TOKEN"]))
    assert result.outcome == Outcome.refused and "no host-side credential endpoint" in result.detail
    result = await sb.run(spec(ws, "touch RAN", secrets=["ANTHROPIC_API_KEY"]))
    assert result.outcome == Outcome.refused and "not set" in result.detail
    assert not (ws / "RAN").exists()


def test_get_sandbox_picks_backend() -> None:
    from adapters.sandbox.modal_sandbox import ModalSandbox

    assert isinstance(get_sandbox(SandboxPolicy(backend="local"), Settings()), BubblewrapSandbox)
    assert isinstance(get_sandbox(SandboxPolicy(backend="modal"), Settings()), ModalSandbox)


def test_bwrap_argv_policy() -> None:
    """The mechanism for the filesystem policy, read as a list: what is bound and how."""
    ws = Path("/srv/ws")
    argv = BubblewrapSandbox().bwrap_argv(SandboxSpec(workspace=ws, argv=["x"], tmp_mb=8), ws, Path("/i"), None)
    joined = " ".join(argv)
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--cap-drop ALL", "--disable-userns",
                 "--new-session", "--die-with-parent", "--proc /proc", f"--size {8 << 20} --perms 1777 --tmpfs /tmp"):
        assert flag in joined
    assert "--bind /srv/ws /workspace" in joined and "--proc /proc --remount-ro /proc" in joined
    assert joined.endswith("--remount-ro / --chdir /workspace")
    etc = bubblewrap.etc_snapshot()
    assert f"--ro-bind {etc} /etc" in joined
    assert (etc / "passwd").is_file() and (etc / "ssl" / "certs").is_dir()
    assert not (etc / "shadow").exists() and not (etc / "ssh").exists() and not (etc / "ssl" / "private").exists()


async def test_heartbeats_while_running(sandbox, repo, monkeypatch) -> None:
    ws, _ = repo
    monkeypatch.setattr(bubblewrap, "HEARTBEAT_EVERY_S", 0.1)
    beats: list[float] = []
    result = await sandbox.run(spec(ws, "sleep 0.6"), heartbeat=lambda: beats.append(1))
    assert result.outcome == Outcome.ok and len(beats) >= 3


async def test_cancellation_kills_the_whole_tree(sandbox, repo) -> None:
    import asyncio

    ws, _ = repo
    script = "(setsid sh -c 'sleep 0.6; touch /workspace/SURVIVOR' &); sleep 0.6; touch /workspace/MAIN"
    task = asyncio.ensure_future(sandbox.run(spec(ws, script)))
    await asyncio.sleep(0.25)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.8)
    assert not (ws / "SURVIVOR").exists() and not (ws / "MAIN").exists()
