"""Modal backend: the same SandboxSpec mapped onto `modal.Sandbox.create` and `Sandbox.exec`.

Mapping (exact, unit-tested against a fake at the `modal` seam):
  image            -> spec.image: "im-..." = Image.from_id, other text = Image.from_registry,
                      empty = Image.debian_slim().apt_install("git")
  timeout          -> whole-sandbox lifetime: the job's wall clocks + margin (each exec has its own)
  cpu, memory      -> (request, limit) tuples, so they are hard caps
  network          -> block_network=True when allow_domains is empty, else outbound_domain_allowlist
  secrets          -> modal.Secret.from_name for exactly the listed names
  workdir          -> /workspace
The repository goes in as a git bundle made by the trusted side from the prepared workspace
(never a token); the patch comes back from `git diff --cached --binary` run inside; the sandbox
is terminated in `finally`. Not expressible on Modal: allow_ports (its allowlist is by name),
pids, disk and tmp sizes — recorded in the result's `detail`.
"""

from __future__ import annotations

import asyncio
import math
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from adapters.sandbox.base import (
    INPUTS_DIR,
    OUTBOX_DIR,
    HeartbeatCallback,
    Outcome,
    SandboxError,
    SandboxJob,
    SandboxJobResult,
    SandboxResult,
    SandboxSpec,
)
from adapters.sandbox.patch import OUTBOX_FILE_CAP, PATCH_ENV, PATCH_SCRIPT, patch_spec
from conveyor.config import Settings

APP_NAME = "conveyor-sandboxes"
WORKDIR = "/workspace"
BUNDLE = "/tmp/conveyor-repo.bundle"
LIFETIME_MARGIN_S = 120
HEARTBEAT_EVERY_S = 5.0
TRUNCATION_MARK = b"\n[conveyor: output truncated at %d bytes]\n"
UNENFORCED = "not enforced on Modal: allow_ports, pids, disk/tmp size"


class ModalSandbox:
    name = "modal"

    def __init__(self, settings: Settings | None = None, *, modal_module: Any = None, app_name: str = APP_NAME) -> None:
        self.settings = settings
        self._modal = modal_module
        self.app_name = app_name

    @property
    def modal(self) -> Any:
        if self._modal is None:
            import modal  # imported lazily: the local backend must not pay for it

            self._modal = modal
        return self._modal

    def available(self) -> str | None:
        try:
            self.modal
        except ImportError as exc:
            return f"the modal package is not installed: {exc}"
        return None

    # ---- mapping -----------------------------------------------------------------------------

    def image_for(self, spec: SandboxSpec) -> Any:
        ref = spec.image.strip()
        if not ref:
            return self.modal.Image.debian_slim().apt_install("git")
        if ref.startswith("im-"):
            return self.modal.Image.from_id(ref)
        return self.modal.Image.from_registry(ref)

    def create_kwargs(self, spec: SandboxSpec, app: Any, lifetime_s: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            app=app,
            image=self.image_for(spec),
            secrets=[self.modal.Secret.from_name(name) for name in spec.secrets],
            timeout=int(math.ceil(lifetime_s)) + LIFETIME_MARGIN_S,
            workdir=WORKDIR,
            cpu=(spec.cpus, spec.cpus),
            memory=(spec.memory_mb, spec.memory_mb),
        )
        if spec.allow_domains:
            kwargs["outbound_domain_allowlist"] = list(spec.allow_domains)
        else:
            kwargs["block_network"] = True
        return kwargs

    # ---- public API --------------------------------------------------------------------------

    async def run(self, spec: SandboxSpec, heartbeat: HeartbeatCallback | None = None) -> SandboxResult:
        job = SandboxJob(base_sha="0" * 40, agent=spec)
        result = await self._job(job, heartbeat, with_patch=False)
        return result.agent

    async def run_job(self, job: SandboxJob, heartbeat: HeartbeatCallback | None = None) -> SandboxJobResult:
        return await self._job(job, heartbeat, with_patch=True)

    async def _job(self, job: SandboxJob, heartbeat: HeartbeatCallback | None, with_patch: bool) -> SandboxJobResult:
        spec = job.agent
        refused = lambda why: SandboxJobResult(  # noqa: E731
            agent=SandboxResult(outcome=Outcome.refused, detail=why), patch_error="agent step was refused"
        )
        reason = self.available()
        if reason:
            return refused(reason)
        try:
            bundle = make_bundle(spec.workspace)
        except SandboxError as exc:
            return refused(str(exc))
        lifetime = spec.wall_clock_s + (job.setup.wall_clock_s if job.setup else 0) + (300 if with_patch else 0)
        modal = self.modal
        sandbox = None
        try:
            app = await modal.App.lookup.aio(self.app_name, create_if_missing=True)
            # Created with the agent's spec: network, secrets and caps hold for the whole sandbox.
            # The setup step's extra registries are not added (Modal's allowlist is per sandbox).
            sandbox = await modal.Sandbox.create.aio("sleep", "infinity", **self.create_kwargs(spec, app, lifetime))
            sandbox_id = sandbox.object_id
            await self._prepare(sandbox, spec, bundle, job.base_sha if with_patch else "")
            result = SandboxJobResult(agent=SandboxResult(outcome=Outcome.refused), sandbox_id=sandbox_id)
            if job.setup is not None:
                result.setup = await self._exec(sandbox, job.setup, heartbeat)
                result.setup.sandbox_id = sandbox_id
                if result.setup.outcome != Outcome.ok:
                    result.agent = SandboxResult(outcome=Outcome.refused, detail="not run: the setup step failed")
                    result.patch_error = "setup step failed"
                    return result
            result.agent = await self._exec(sandbox, spec, heartbeat)
            result.agent.sandbox_id = sandbox_id
            if spec.outbox:
                result.agent.outbox = await self._read_outbox(sandbox)
            if with_patch:
                result.patch, result.patch_error = await self._patch(sandbox, job)
            return result
        except Exception as exc:  # Modal errors: the run is refused, never retried unsandboxed
            return refused(f"modal sandbox failed: {exc.__class__.__name__}: {exc}")
        finally:
            if sandbox is not None:
                try:
                    await sandbox.terminate.aio()
                except Exception:
                    pass

    async def _prepare(self, sandbox: Any, spec: SandboxSpec, bundle: bytes, base_sha: str) -> None:
        fs = sandbox.filesystem
        await fs.write_bytes.aio(bundle, BUNDLE)
        checkout = f"git clone --quiet {BUNDLE} {WORKDIR} && rm -f {BUNDLE}"
        if base_sha:
            checkout += f" && git -C {WORKDIR} checkout --quiet --detach {shlex.quote(base_sha)}"
        await self._check(sandbox, ["sh", "-c", checkout], "checkout")
        await fs.make_directory.aio(INPUTS_DIR, create_parents=True)
        for name, content in spec.inputs.items():
            if "/" in name or name in ("", ".", "..", "out"):
                raise SandboxError(f"input name {name!r} is not a plain file name")
            await fs.write_text.aio(content, f"{INPUTS_DIR}/{name}")
        if spec.outbox:
            await fs.make_directory.aio(OUTBOX_DIR, create_parents=True)
        # Inputs are read-only to the run (as far as a container's root user is bound by modes).
        await self._check(sandbox, ["sh", "-c", f"find {INPUTS_DIR} -maxdepth 1 -type f -exec chmod 0444 {{}} +"], "inputs")

    async def _check(self, sandbox: Any, argv: list[str], what: str) -> None:
        proc = await sandbox.exec.aio(*argv, timeout=300, text=False)
        code = await proc.wait.aio()
        if code != 0:
            err = await proc.stderr.read.aio()
            raise SandboxError(f"{what} failed in the sandbox ({code}): {err[-500:]!r}")

    async def _exec(self, sandbox: Any, spec: SandboxSpec, heartbeat: HeartbeatCallback | None) -> SandboxResult:
        started = time.monotonic()
        timeout = int(math.ceil(spec.wall_clock_s))
        proc = await sandbox.exec.aio(*spec.argv, timeout=timeout, workdir=WORKDIR, env=dict(spec.env), text=False)
        if spec.stdin:
            proc.stdin.write(spec.stdin)
            proc.stdin.write_eof()
            await proc.stdin.drain.aio()
        cap = spec.output_cap_bytes
        output = bytearray()
        overflow = asyncio.Event()

        async def pump(stream: Any) -> None:
            async for chunk in stream:
                room = cap - len(output)
                if room > 0:
                    output.extend(chunk[:room])
                if len(chunk) > room:
                    overflow.set()
                    return

        pumps = asyncio.gather(pump(proc.stdout), pump(proc.stderr))
        beats = asyncio.ensure_future(_beat(heartbeat))
        stop: Outcome | None = None
        code: int | None = None
        try:
            waiter = asyncio.ensure_future(proc.wait.aio())
            over = asyncio.ensure_future(overflow.wait())
            done, _ = await asyncio.wait(
                {waiter, over}, timeout=spec.wall_clock_s + 30, return_when=asyncio.FIRST_COMPLETED
            )
            over.cancel()
            if waiter in done:
                code = waiter.result()
                try:
                    await asyncio.wait_for(pumps, 30)
                except asyncio.TimeoutError:
                    pass
            else:
                waiter.cancel()
                # An exec cannot be killed on its own: stop the whole sandbox (no patch follows).
                stop = Outcome.output_cap if overflow.is_set() else Outcome.timeout
                await sandbox.terminate.aio()
        finally:
            beats.cancel()
            pumps.cancel()
        elapsed = time.monotonic() - started
        truncated = overflow.is_set()
        if stop is None:
            if truncated:
                stop = Outcome.output_cap
            elif code == -1 or elapsed >= spec.wall_clock_s:
                stop = Outcome.timeout
        data = bytes(output) + (TRUNCATION_MARK % cap if truncated else b"")
        if stop is not None:
            outcome, detail = stop, {
                Outcome.timeout: f"wall clock of {spec.wall_clock_s:g}s exceeded",
                Outcome.output_cap: f"output passed the {cap}-byte cap",
            }[stop]
        elif code == 0:
            outcome, detail = Outcome.ok, ""
        else:
            outcome, detail = Outcome.exit_nonzero, f"exited with {code}" + (" (SIGKILL: possibly the memory cap)" if code == 137 else "")
        return SandboxResult(
            outcome=outcome,
            exit_code=code,
            output=data,
            output_truncated=truncated,
            duration_s=elapsed,
            detail=f"{detail}; {UNENFORCED}" if detail else UNENFORCED,
        )

    async def _patch(self, sandbox: Any, job: SandboxJob) -> tuple[bytes, str]:
        try:
            patch_spec(job)  # validates base_sha
        except ValueError as exc:
            return b"", str(exc)
        proc = await sandbox.exec.aio(
            "sh", "-c", PATCH_SCRIPT, "conveyor-patch", job.base_sha, timeout=300, workdir=WORKDIR, env=dict(PATCH_ENV), text=False
        )
        data = bytearray()
        async for chunk in proc.stdout:
            data.extend(chunk)
            if len(data) > job.max_patch_bytes:
                return b"", f"patch exceeds max_patch_bytes ({job.max_patch_bytes} bytes)"
        code = await proc.wait.aio()
        if code != 0:
            return b"", f"patch step failed ({code}): {bytes(data[-2000:]).decode(errors='replace')}"
        return bytes(data), ""

    async def _read_outbox(self, sandbox: Any) -> dict[str, str]:
        files: dict[str, str] = {}
        fs = sandbox.filesystem
        try:
            entries = await fs.list_files.aio(OUTBOX_DIR)
        except Exception:
            return files
        for entry in sorted(entries, key=lambda e: e.name)[:32]:
            if not entry.is_file() or "/" in entry.name:
                continue
            name = entry.name
            proc = await sandbox.exec.aio("head", "-c", str(OUTBOX_FILE_CAP), f"{OUTBOX_DIR}/{name}", timeout=30, text=False)
            data = await proc.stdout.read.aio()
            await proc.wait.aio()
            files[name] = bytes(data[:OUTBOX_FILE_CAP]).decode("utf-8", errors="replace")
        return files


def make_bundle(workspace: Path) -> bytes:
    """A git bundle of the prepared workspace's HEAD, made on the trusted side before any run."""
    if not (workspace / ".git").exists():
        raise SandboxError(f"modal backend needs a git workspace; {workspace} has no .git")
    with tempfile.TemporaryDirectory(prefix="conveyor-bundle-") as tmp:
        path = Path(tmp) / "repo.bundle"
        proc = subprocess.run(
            ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-C", str(workspace),
             "bundle", "create", "--quiet", str(path), "HEAD"],
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": tmp},
            timeout=300,
        )
        if proc.returncode != 0:
            raise SandboxError(f"git bundle failed: {proc.stderr.decode(errors='replace').strip()}")
        return path.read_bytes()


async def _beat(heartbeat: HeartbeatCallback | None) -> None:
    if heartbeat is None:
        return
    while True:
        await asyncio.sleep(HEARTBEAT_EVERY_S)
        heartbeat()
