"""Modal backend at the `modal` seam: exact create/exec calls, and a job carried through a fake
whose "container" is a real local bubblewrap root (so clone, agent and patch really run).
An opt-in live test runs only with MODAL_TOKEN_ID set."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.sandbox.base import Outcome, SandboxJob, SandboxSpec
from adapters.sandbox.modal_sandbox import ModalSandbox
from adapters.sandbox.patch import PATCH_ENV, PATCH_SCRIPT


class Aio:
    """A synchronicity-style method: the backend only ever calls `.aio(...)`."""

    def __init__(self, fn) -> None:
        self.aio = fn


class FakeImage:
    def __init__(self, desc: str) -> None:
        self.desc = desc

    def apt_install(self, *pkgs: str) -> "FakeImage":
        return FakeImage(f"{self.desc}+apt:{','.join(pkgs)}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeImage) and other.desc == self.desc


class Stream:
    def __init__(self, data: bytes, chunk: int = 65536) -> None:
        self.data = data
        self.chunk = chunk
        self.read = Aio(self._read)

    async def _read(self) -> bytes:
        return self.data

    async def __aiter__(self):
        for i in range(0, len(self.data), self.chunk):
            yield self.data[i : i + self.chunk]
            await asyncio.sleep(0)


class FakeContainer:
    """The sandbox's filesystem is a host directory; exec runs argv in bwrap rooted there."""

    def __init__(self, root: Path, log: list) -> None:
        self.root = root
        for d in ("workspace", "tmp", "run"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.log = log
        self.object_id = "sb-fake123"
        self.terminated = 0
        self.exec = Aio(self._exec)
        self.terminate = Aio(self._terminate)
        self.filesystem = SimpleNamespace(
            write_bytes=Aio(self._write_bytes), write_text=Aio(self._write_text),
            make_directory=Aio(self._mkdir), list_files=Aio(self._list),
        )

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    async def _write_bytes(self, data: bytes, path: str) -> None:
        self.host(path).write_bytes(data)

    async def _write_text(self, data: str, path: str) -> None:
        self.host(path).write_text(data)

    async def _mkdir(self, path: str, create_parents: bool = True) -> None:
        self.host(path).mkdir(parents=create_parents, exist_ok=True)

    async def _list(self, path: str) -> list:
        return [SimpleNamespace(name=p.name, path=f"{path}/{p.name}", is_file=p.is_file) for p in self.host(path).iterdir()]

    async def _terminate(self) -> None:
        self.terminated += 1

    async def _exec(self, *argv: str, timeout: int | None = None, workdir: str | None = None,
                    env: dict | None = None, text: bool = True) -> Any:
        self.log.append(("exec", argv, dict(timeout=timeout, workdir=workdir, env=env, text=text)))
        assert text is False
        cmd = ["bwrap", "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--ro-bind", "/usr", "/usr",
               "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
               "--proc", "/proc", "--dev", "/dev", "--bind", str(self.root / "tmp"), "/tmp",
               "--bind", str(self.root / "run"), "/run", "--bind", str(self.root / "workspace"), "/workspace",
               "--chdir", workdir or "/", "--", *argv]
        full_env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **(env or {})}
        try:
            proc = subprocess.run(cmd, capture_output=True, env=full_env, timeout=timeout)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = -1, exc.stdout or b"", exc.stderr or b""  # modal reports an exec timeout as -1
        return SimpleNamespace(stdout=Stream(out), stderr=Stream(err), wait=Aio(_const(code)),
                               stdin=SimpleNamespace(write=lambda d: None, write_eof=lambda: None, drain=Aio(_const(None))))


def _const(value):
    async def f(*a, **k):
        return value
    return f


def fake_modal(tmp_path: Path) -> tuple[Any, list]:
    log: list = []
    containers: list[FakeContainer] = []

    async def lookup(name: str, create_if_missing: bool = False):
        log.append(("lookup", name, create_if_missing))
        return "app-handle"

    async def create(*args: str, **kwargs):
        log.append(("create", args, kwargs))
        box = FakeContainer(tmp_path / f"container{len(containers)}", log)
        containers.append(box)
        return box

    modal = SimpleNamespace(
        App=SimpleNamespace(lookup=Aio(lookup)),
        Sandbox=SimpleNamespace(create=Aio(create)),
        Image=SimpleNamespace(
            debian_slim=lambda: FakeImage("debian_slim"),
            from_registry=lambda ref: FakeImage(f"registry:{ref}"),
            from_id=lambda ref: FakeImage(f"id:{ref}"),
        ),
        Secret=SimpleNamespace(from_name=lambda name: ("secret", name)),
        containers=containers,
    )
    return modal, log


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="the fake container uses bubblewrap")


def test_create_kwargs_exact(tmp_path) -> None:
    modal, _ = fake_modal(tmp_path)
    backend = ModalSandbox(modal_module=modal)
    spec = SandboxSpec(workspace=tmp_path, argv=["x"], cpus=2.0, memory_mb=4096, allow_domains=["api.example.com", "*.pypi.org"],
                       secrets=["ANTHROPIC", "NPM"], image="python:3.12-slim", wall_clock_s=600)
    assert backend.create_kwargs(spec, "app", 600) == dict(
        app="app", image=FakeImage("registry:python:3.12-slim"), secrets=[("secret", "ANTHROPIC"), ("secret", "NPM")],
        timeout=720, workdir="/workspace", cpu=(2.0, 2.0), memory=(4096, 4096),
        outbound_domain_allowlist=["api.example.com", "*.pypi.org"],
    )
    closed = backend.create_kwargs(SandboxSpec(workspace=tmp_path, argv=["x"], image="im-abc"), "app", 10)
    assert closed["block_network"] is True and "outbound_domain_allowlist" not in closed
    assert closed["image"] == FakeImage("id:im-abc") and closed["secrets"] == []
    default = backend.create_kwargs(SandboxSpec(workspace=tmp_path, argv=["x"]), "app", 10)
    assert default["image"] == FakeImage("debian_slim+apt:git")


@needs_bwrap
async def test_job_through_the_seam(tmp_path, repo) -> None:
    ws, sha = repo
    modal, log = fake_modal(tmp_path)
    beats: list[int] = []
    agent = SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", "cat /run/conveyor/task.md; echo v2 > src/app.py; echo s > /run/conveyor/out/summary.md"],
                        env={"A": "1"}, inputs={"task.md": "the task"}, outbox=True, wall_clock_s=30, memory_mb=512, cpus=1.5)
    setup = SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", "echo setup-ran"], wall_clock_s=20)
    result = await ModalSandbox(modal_module=modal).run_job(
        SandboxJob(base_sha=sha, agent=agent, setup=setup), heartbeat=lambda: beats.append(1)
    )
    assert result.agent.outcome == Outcome.ok, result
    assert result.sandbox_id == "sb-fake123" and result.agent.sandbox_id == "sb-fake123"
    assert result.setup is not None and b"setup-ran" in result.setup.output
    assert b"the task" in result.agent.output and result.agent.outbox == {"summary.md": "s\n"}
    assert "+v2" in result.patch.decode() and result.patch_error == ""
    [create] = [entry for entry in log if entry[0] == "create"]
    assert create[1] == ("sleep", "infinity")
    assert create[2]["timeout"] == 30 + 20 + 300 + 120 and create[2]["block_network"] is True
    assert create[2]["cpu"] == (1.5, 1.5) and create[2]["memory"] == (512, 512) and create[2]["app"] == "app-handle"
    execs = [entry for entry in log if entry[0] == "exec"]
    assert execs[0][1][:2] == ("sh", "-c") and "git clone --quiet /tmp/conveyor-repo.bundle /workspace" in execs[0][1][2]
    agent_exec = [e for e in execs if e[1] == tuple(agent.argv)][0]
    assert agent_exec[2] == dict(timeout=30, workdir="/workspace", env={"A": "1"}, text=False)
    patch_exec = [e for e in execs if e[1][:3] == ("sh", "-c", PATCH_SCRIPT)][0]
    assert patch_exec[1][4] == sha and patch_exec[2]["env"] == PATCH_ENV
    assert modal.containers[0].terminated == 1
    assert not (tmp_path / "container0" / "tmp" / "conveyor-repo.bundle").exists()


@needs_bwrap
async def test_timeout_and_output_cap_map_to_outcomes(tmp_path, repo) -> None:
    ws, _ = repo
    modal, _ = fake_modal(tmp_path)
    backend = ModalSandbox(modal_module=modal)
    slow = await backend.run(SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", "sleep 5"], wall_clock_s=1))
    assert slow.outcome == Outcome.timeout
    loud = await backend.run(SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", "head -c 300000 /dev/zero"], output_cap_bytes=1000))
    assert loud.outcome == Outcome.output_cap and loud.output.endswith(b"truncated at 1000 bytes]\n")
    assert all(box.terminated >= 1 for box in modal.containers)


async def test_refused_without_git_workspace(tmp_path) -> None:
    modal, log = fake_modal(tmp_path)
    result = await ModalSandbox(modal_module=modal).run(SandboxSpec(workspace=tmp_path, argv=["true"]))
    assert result.outcome == Outcome.refused and "no .git" in result.detail and log == []


@pytest.mark.skipif(not os.environ.get("MODAL_TOKEN_ID"), reason="live Modal test: set MODAL_TOKEN_ID to run")
async def test_live_modal(repo) -> None:  # pragma: no cover - needs a Modal account
    ws, sha = repo
    job = SandboxJob(base_sha=sha, agent=SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", "echo live >> README.md"], wall_clock_s=120))
    result = await ModalSandbox().run_job(job)
    assert result.agent.outcome == Outcome.ok and "+live" in result.patch.decode() and result.sandbox_id.startswith("sb-")
