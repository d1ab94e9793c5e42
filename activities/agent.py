"""Stage 2: run the agent in the sandbox and bring back a validated patch (by reference)."""

from __future__ import annotations

import asyncio
import fcntl
import time
from contextlib import asynccontextmanager

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.base import Deps, host_errors
from adapters.agents import UnknownAgent, get_agent
from adapters.agents.base import AgentTask
from adapters.patch import PatchRejected, validate_patch
from adapters.sandbox import get_sandbox
from adapters.sandbox.base import Outcome, SandboxError, SandboxJob
from adapters.sandbox.model_proxy import ENDPOINTS, sandbox_base_url
from adapters.sandbox.output import printable
from conveyor.models import AgentOutcome, AgentRunInput, AgentRunResult

HEARTBEAT_EVERY_S = 1.0
MAX_SLOTS = 8
SLOT_POLL_S = 0.5

_LIMIT_OUTCOMES = {
    Outcome.timeout: AgentOutcome.timeout,
    Outcome.memory: AgentOutcome.memory,
    Outcome.pids: AgentOutcome.pids,
    Outcome.disk: AgentOutcome.disk,
    Outcome.output_cap: AgentOutcome.output_cap,
    Outcome.refused: AgentOutcome.refused,
}


def model_base_url(secrets: list[str]) -> str:
    """The in-sandbox URL of the host-side endpoint that adds the model key (never the key)."""
    for secret in secrets:
        if secret in ENDPOINTS:
            return sandbox_base_url(secret)
    return ""


class AgentActivities:
    def __init__(self, deps: Deps):
        self.deps = deps

    def _try_slot(self, repo_key: str):
        """A free warm workspace slot for this repo (path, held lock), or None if all are busy."""
        root = self.deps.settings.workspaces_dir / repo_key
        root.mkdir(parents=True, exist_ok=True)
        for slot in range(MAX_SLOTS):
            lock = open(root / f"slot-{slot}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            return root / f"slot-{slot}", lock
        return None

    @asynccontextmanager
    async def _workspace(self, repo_key: str):
        """A warm workspace slot for this repo, held exclusively for one run. When all are busy,
        wait (heartbeating) for one: failing would spend one of the run's few attempts per second,
        so a burst of more tasks than slots would fail the extra tasks outright."""
        while (got := self._try_slot(repo_key)) is None:
            activity.heartbeat()
            await asyncio.sleep(SLOT_POLL_S)
        path, lock = got
        try:
            yield path
        finally:
            lock.close()

    @activity.defn(name="run_agent")
    @host_errors
    async def run_agent(self, inp: AgentRunInput) -> AgentRunResult:
        try:
            agent = get_agent(inp.agent)
        except UnknownAgent as exc:
            raise ApplicationError(str(exc), type="UnknownAgent", non_retryable=True) from None
        policy = inp.repo.sandbox
        sandbox = get_sandbox(policy, self.deps.settings)
        if reason := sandbox.available():
            # Fail closed: never run an agent unsandboxed.
            return AgentRunResult(outcome=AgentOutcome.refused, detail=f"sandbox unavailable: {reason}")
        context = self.deps.store.get(inp.context).decode("utf-8", "replace")
        task = AgentTask(
            text=inp.text,
            context_document=context,
            test_command=inp.repo.test_command,
            max_turns=inp.repo.max_turns,
            max_cost_usd=inp.repo.max_cost_usd,
            model_base_url=model_base_url(policy.secrets),
        )
        async with self._workspace(self.deps.repo_key(inp.repo)) as workspace:
            host = self.deps.codehost(inp.repo)
            start_sha = inp.base_sha
            if inp.follow_up_branch:
                start_sha = host.resolve_base(inp.repo, inp.follow_up_branch)
            # A big repository takes longer than the heartbeat timeout to check out: heartbeat
            # through it too, or the attempt is timed out before the agent ever starts.
            checkout = asyncio.ensure_future(asyncio.to_thread(host.checkout, inp.repo, start_sha, workspace))
            try:
                await self._with_heartbeats(asyncio.shield(checkout))
            except asyncio.CancelledError:
                # A thread cannot be interrupted: keep the slot locked until git is done writing
                # into it, or the next run would share the workspace with a checkout in flight.
                await asyncio.wait({checkout})
                raise
            try:
                invocation = agent.invocation(task)
            except ValueError as exc:  # e.g. a model agent on a repo whose policy lists no model key
                raise ApplicationError(str(exc), type="AgentConfig", non_retryable=True) from None
            job = SandboxJob.from_policy(
                policy,
                workspace,
                start_sha,
                invocation.argv,
                max_patch_bytes=inp.repo.max_patch_bytes,
                env={**policy.env, **invocation.env},
                inputs=invocation.inputs,
                outbox=True,
            )
            started = time.monotonic()
            try:
                result = await self._with_heartbeats(sandbox.run_job(job, heartbeat=lambda: None))
            except SandboxError as exc:
                return AgentRunResult(outcome=AgentOutcome.refused, detail=f"sandbox refused the run: {exc}")
        return self._result(inp, agent, result, time.monotonic() - started)

    async def _with_heartbeats(self, coro):
        """Heartbeat while the sandbox runs, so a dead worker is noticed and a cancel arrives."""
        task = asyncio.ensure_future(coro)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_S)
                if done:
                    return task.result()
                activity.heartbeat()
        except asyncio.CancelledError:
            task.cancel()  # the backend kills the whole sandbox tree on cancellation
            try:
                await task
            except BaseException:
                pass
            raise

    def _result(self, inp: AgentRunInput, agent, result, duration: float) -> AgentRunResult:
        store = self.deps.store
        if result.setup is not None and result.setup.outcome != Outcome.ok:
            out = result.setup
            return AgentRunResult(
                outcome=_LIMIT_OUTCOMES.get(out.outcome, AgentOutcome.failed),
                exit_code=out.exit_code,
                detail=f"setup step failed ({out.outcome.value}): {out.detail}".strip(),
                transcript=store.put(out.output),
                duration_s=duration,
                sandbox_id=result.sandbox_id,
            )
        report = agent.report(result.agent)
        transcript = store.put(report.transcript.encode("utf-8", "replace"))
        common = dict(
            agent=inp.agent,
            exit_code=result.agent.exit_code,
            transcript=transcript,
            # Agent-written text goes to terminals, Slack and PR bodies: no escape sequences.
            summary=printable(report.summary.encode("utf-8", "replace"))[:4000],
            cost_usd=report.cost_usd,
            turns=report.turns,
            duration_s=duration,
            sandbox_id=result.sandbox_id or result.agent.sandbox_id,
            egress=[*(result.setup.egress if result.setup else []), *result.agent.egress][:200],
        )
        if result.agent.outcome in _LIMIT_OUTCOMES:
            detail = result.agent.detail or f"stopped by the {result.agent.outcome.value} limit"
            return AgentRunResult(outcome=_LIMIT_OUTCOMES[result.agent.outcome], detail=detail, **common)
        if report.outcome == "budget":
            return AgentRunResult(outcome=AgentOutcome.budget, detail=report.detail, **common)
        if report.outcome != "ok":
            return AgentRunResult(outcome=AgentOutcome.failed, detail=report.detail, **common)
        if result.patch_error:
            return AgentRunResult(outcome=AgentOutcome.failed, detail=f"patch refused: {result.patch_error}", **common)
        if not result.patch.strip():
            return AgentRunResult(outcome=AgentOutcome.ok, **common)
        try:
            stats = validate_patch(result.patch, inp.repo.max_patch_bytes)
        except PatchRejected as exc:
            return AgentRunResult(outcome=AgentOutcome.failed, detail=f"patch refused: {exc}", **common)
        return AgentRunResult(
            outcome=AgentOutcome.ok,
            patch=store.put(result.patch),
            files_changed=len(stats.files),
            lines_added=stats.lines_added,
            lines_removed=stats.lines_removed,
            **common,
        )

