"""The patch step of a SandboxJob: `git add -A; git diff --cached --binary BASE`, run INSIDE a sandbox
(no network, small limits) so trusted code never runs git in a tree the agent controlled."""

from __future__ import annotations

import re

from adapters.sandbox.base import Outcome, SandboxJob, SandboxResult, SandboxSpec

OUTBOX_FILE_CAP = 64 * 1024

# Safe git: no hooks, no fsmonitor, no external diff or textconv, no pager, no network protocols.
GIT = (
    "git -c core.hooksPath=/dev/null -c core.fsmonitor=false -c core.untrackedCache=false "
    "-c core.pager=cat -c core.quotePath=false -c protocol.allow=never -c gc.auto=0"
)
PATCH_SCRIPT = f"""set -u
{GIT} add -A 2>/tmp/err || {{ echo "git add failed:"; cat /tmp/err; exit 3; }}
{GIT} diff --cached --binary --full-index --no-color --no-ext-diff --no-textconv --no-renames "$1" 2>/tmp/err \\
  || {{ echo "git diff failed:"; cat /tmp/err; exit 4; }}
"""
PATCH_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_PAGER": "cat",
}
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def patch_spec(job: SandboxJob) -> SandboxSpec:
    if not _SHA.match(job.base_sha):
        raise ValueError(f"base_sha {job.base_sha!r} is not a full commit id")
    agent = job.agent
    return SandboxSpec(
        workspace=agent.workspace,
        argv=["/bin/sh", "-c", PATCH_SCRIPT, "conveyor-patch", job.base_sha],
        env=dict(PATCH_ENV),
        allow_domains=[],
        cpus=max(agent.cpus, 1.0),
        memory_mb=min(max(agent.memory_mb, 256), 1024),
        pids=64,
        disk_mb=agent.disk_mb,
        inodes=agent.inodes,
        read_only_paths=list(agent.read_only_paths),
        tmp_mb=16,
        wall_clock_s=min(agent.wall_clock_s, 300),
        output_cap_bytes=job.max_patch_bytes,
    )


def read_patch_result(run: SandboxResult, max_patch_bytes: int) -> tuple[bytes, str]:
    """(patch, error): the patch bytes, or why there is none."""
    if run.outcome == Outcome.ok:
        return run.output, ""
    if run.outcome == Outcome.output_cap:
        return b"", f"patch exceeds max_patch_bytes ({max_patch_bytes} bytes)"
    text = run.output.decode("utf-8", errors="replace").strip()[-2000:]
    return b"", f"patch step {run.outcome.value}: {run.detail}; {text}".strip("; ")
