"""The Sandbox protocol: policy (SandboxSpec) apart from mechanism (backends)."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

from conveyor.config import SandboxPolicy


class SandboxError(Exception):
    """Isolation could not be set up. The run is refused: never run unsandboxed."""


class SandboxSpec(BaseModel):
    """Everything one sandboxed command may use. Built from the repo's SandboxPolicy."""

    workspace: Path
    """Host directory mounted read-write at /workspace; the only writable path besides /tmp."""
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    """The complete environment: nothing is inherited from the worker."""
    allow_domains: list[str] = Field(default_factory=list)
    allow_ports: list[int] = Field(default_factory=lambda: [443])
    cpus: float = 1.0
    memory_mb: int = 2048
    pids: int = 512
    disk_mb: int = 2048
    tmp_mb: int = 512
    wall_clock_s: float = 1800
    output_cap_bytes: int = 8 * 1024 * 1024
    inodes: int = 0
    """Cap on files+directories in the workspace; 0 = derived from disk_mb (64 per MB, at least 4096)."""
    secrets: list[str] = Field(default_factory=list)
    stdin: bytes = b""
    inputs: dict[str, str] = Field(default_factory=dict)
    """Files provided read-only at /run/conveyor/<name> (task.md, context.md)."""
    read_only_paths: list[Path] = Field(default_factory=list)
    """Host directories bound read-only at the same path (local backend), e.g. the object stores a
    `git clone --shared` workspace borrows (see `git_alternates`). Trusted input: compute it when
    preparing the workspace, never from the tree after an agent ran."""
    image: str = ""
    """Modal image for the repo's profile (ignored by the local backend)."""
    outbox: bool = False
    """Give the run a writable /run/conveyor/out (agent summary); read back into SandboxResult.outbox."""

    @classmethod
    def from_policy(cls, policy: SandboxPolicy, workspace: Path, argv: list[str], **overrides) -> "SandboxSpec":
        values = dict(
            workspace=workspace,
            argv=argv,
            env=dict(policy.env),
            allow_domains=list(policy.allow_domains),
            allow_ports=list(policy.allow_ports),
            cpus=policy.cpus,
            memory_mb=policy.memory_mb,
            pids=policy.pids,
            disk_mb=policy.disk_mb,
            tmp_mb=policy.tmp_mb,
            wall_clock_s=policy.wall_clock_s,
            output_cap_bytes=policy.output_cap_bytes,
            secrets=list(policy.secrets),
            image=policy.image,
            read_only_paths=[Path(p) for p in policy.tool_paths],
        )
        values.update(overrides)
        return cls(**values)


def git_alternates(workspace: Path) -> list[Path]:
    """Object directories a workspace borrows through .git/objects/info/alternates (`--shared`)."""
    objects = workspace / ".git" / "objects"
    try:
        lines = (objects / "info" / "alternates").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            path = (objects / line).resolve() if not line.startswith("/") else Path(line).resolve()
            if path.is_dir():
                found.append(path)
    return found


class Outcome(str, Enum):
    ok = "ok"
    exit_nonzero = "exit_nonzero"
    timeout = "timeout"
    memory = "memory"
    pids = "pids"
    disk = "disk"
    output_cap = "output_cap"
    refused = "refused"


class SandboxResult(BaseModel):
    outcome: Outcome
    exit_code: int | None = None
    output: bytes = b""
    """stdout+stderr interleaved, truncated at the cap (and marked)."""
    output_truncated: bool = False
    duration_s: float = 0.0
    detail: str = ""
    sandbox_id: str = ""
    egress: list[str] = Field(default_factory=list)
    outbox: dict[str, str] = Field(default_factory=dict)
    """Small text files the run left in /run/conveyor/out (each capped at 64 KiB)."""


INPUTS_DIR = "/run/conveyor"
OUTBOX_DIR = "/run/conveyor/out"


OutputCallback = Callable[[bytes], None]
HeartbeatCallback = Callable[[], None]


class Sandbox(Protocol):
    """Run one command under a SandboxSpec. Implementations: bubblewrap (local), Modal."""

    name: str

    async def run(self, spec: SandboxSpec, heartbeat: HeartbeatCallback | None = None) -> SandboxResult: ...

    async def run_job(self, job: "SandboxJob", heartbeat: HeartbeatCallback | None = None) -> "SandboxJobResult":
        """Setup step (if any), agent step, then the patch against job.base_sha read back from inside."""
        ...

    def available(self) -> str | None:
        """None when the backend can run here, else the reason it cannot (fail closed)."""
        ...


class SandboxJob(BaseModel):
    """One agent run: optional setup step, the agent step, then the patch read back.

    The trusted side prepared `spec.workspace` at `base_sha`. The patch is computed inside the
    sandbox (`git add -A; git diff --cached --binary base_sha`), so trusted code never runs git in
    a tree the agent controlled.
    """

    base_sha: str
    agent: SandboxSpec
    setup: SandboxSpec | None = None
    max_patch_bytes: int = 5 * 1024 * 1024

    @classmethod
    def from_policy(
        cls,
        policy: SandboxPolicy,
        workspace: Path,
        base_sha: str,
        argv: list[str],
        *,
        max_patch_bytes: int = 5 * 1024 * 1024,
        **agent_overrides,
    ) -> "SandboxJob":
        """Agent step from the policy; setup step (if `setup_command`) under the same limits with
        `setup_allow_domains` added to the allowlist, and without the agent's secrets."""
        agent = SandboxSpec.from_policy(policy, workspace, argv, **agent_overrides)
        setup = None
        if policy.setup_command.strip():
            domains = list(dict.fromkeys([*policy.allow_domains, *policy.setup_allow_domains]))
            setup = SandboxSpec.from_policy(
                policy, workspace, ["/bin/sh", "-c", policy.setup_command], allow_domains=domains, secrets=[]
            )
        return cls(base_sha=base_sha, agent=agent, setup=setup, max_patch_bytes=max_patch_bytes)


class SandboxJobResult(BaseModel):
    setup: SandboxResult | None = None
    agent: SandboxResult
    patch: bytes = b""
    patch_error: str = ""
    sandbox_id: str = ""
