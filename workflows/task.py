"""AgentTaskWorkflow: one task, one durable workflow.

    context -> run agent (sandbox) -> publish change -> review gate -> CI gate -> merge -> revert window

Deterministic code only: every side effect is an activity (see activities/), called by name.
Signals carry who sent them; each is checked against the repo policy snapshotted in the input,
and refusals are recorded in the audit trail rather than acted on.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from conveyor import search
    from conveyor.models import (
        AgentOutcome,
        AgentRunInput,
        AgentRunResult,
        AuditEvent,
        ChangeRequest,
        ChecksInput,
        ChecksResult,
        CloseInput,
        ContextInput,
        ContextResult,
        Decision,
        Identity,
        MergeInput,
        MergeResult,
        Notice,
        PublishInput,
        RevertInput,
        RevertRequest,
        RevertResult,
        Stage,
        TaskRequest,
        TaskResult,
        TaskStatus,
    )

TERMINAL = {
    Stage.reverted,
    Stage.rejected,
    Stage.cancelled,
    Stage.expired,
    Stage.no_changes,
    Stage.too_large,
    Stage.needs_rebase,
    Stage.checks_failed,
    Stage.agent_failed,
    Stage.failed,
}
MAX_AUDIT = 400

# Retry policies: code-host and notifier calls are idempotent, so they retry generously;
# an agent run is expensive, so it gets few attempts (a crashed worker is one of them).
HOST_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30), maximum_attempts=8)
AGENT_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=3)
NOTIFY_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=5)
AGENT_HEARTBEAT = timedelta(seconds=5)
CHECKS_POLL = timedelta(minutes=2)


def failure_message(err: BaseException) -> str:
    """The innermost message of an activity failure, for the requester."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    return str(err) or type(err).__name__


class AuditTrail:
    """The task's audit trail and status, shared by the task and revert workflows."""

    def __init__(self, status: TaskStatus):
        self.status = status

    def record(self, action: str, by: Identity | str = "", via: str = "", detail: str = "") -> None:
        audit = self.status.audit
        if len(audit) >= MAX_AUDIT:  # bounded history: keep the first entries and the newest
            del audit[MAX_AUDIT // 2]
        principal = by.principal if isinstance(by, Identity) else ""
        audit.append(AuditEvent(at=workflow.now(), action=action, by=str(by), principal=principal, via=via, detail=detail[:500]))

    def stage(self, stage: Stage, detail: str = "") -> None:
        self.status.stage = stage
        if detail:
            self.status.detail = detail
        self.record("stage", detail=stage.value + (f": {detail}" if detail else ""))
        workflow.upsert_search_attributes([search.STAGE.value_set(stage.value)])


@workflow.defn(name="AgentTaskWorkflow")
class AgentTaskWorkflow:
    @workflow.init
    def __init__(self, req: TaskRequest) -> None:
        self.req = req
        self.trail = AuditTrail(
            TaskStatus(
                task_id=req.task_id,
                repo=req.repo.name,
                base=req.base,
                text=req.text[:500],
                requester=req.requester.principal,
                source=req.origin.source,
                stage=Stage.received,
            )
        )
        self.change: ChangeRequest | None = None
        self.run_result: AgentRunResult | None = None
        self.approval: Decision | None = None
        self.rejection: Decision | None = None
        self.cancellation: Decision | None = None
        self.revert_request: Decision | None = None
        self.checks_changed = False
        self.refs: dict[str, str] = {}

    @property
    def st(self) -> TaskStatus:
        return self.trail.status

    # ---- the pipeline ------------------------------------------------------------------

    @workflow.run
    async def run(self, req: TaskRequest) -> TaskResult:
        self.trail.record("invoked", req.requester, via=req.origin.source, detail=req.text[:200])
        try:
            await self._pipeline(req)
        except asyncio.CancelledError:
            # Cancelled from Temporal itself (UI, `temporal workflow cancel`), not by signal: the
            # open change must not be left behind for someone to approve by hand.
            self.trail.stage(Stage.cancelled, "cancelled in Temporal")
            await self._close("the task was cancelled in Temporal")
            raise
        except ActivityError as err:
            self.trail.stage(Stage.failed, failure_message(err))
            await self._notify("failed", f"Task failed: {self.st.detail}")
        return TaskResult(status=self.st, repo=req.repo, requester=req.requester, origin=req.origin, refs=self.refs)

    async def _pipeline(self, req: TaskRequest) -> None:
        """The diagram: each step returns False (or None) when the task ends there."""
        context = await self._build_context(req)
        if self.cancellation:
            return await self._cancelled()
        run = await self._run_agent(req, context)
        if run is None:
            return await self._cancelled()
        if not await self._accept_run(req, run):
            return
        if self.cancellation:
            return await self._cancelled()
        if not await self._publish(req, context, run):
            return
        if not await self._review_gate(req):
            return
        if not await self._checks_gate(req):
            return
        if not await self._merge(req):
            return
        await self._revert_window(req)

    async def _build_context(self, req: TaskRequest) -> ContextResult:
        self.trail.stage(Stage.context)
        context: ContextResult = await workflow.execute_activity(
            "build_context",
            ContextInput(task_id=req.task_id, repo=req.repo, base=req.base, text=req.text, origin=req.origin),
            result_type=ContextResult,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=HOST_RETRY,
        )
        self.st.warnings = context.warnings
        return context

    async def _accept_run(self, req: TaskRequest, run: AgentRunResult) -> bool:
        """Record the run; end the task if the agent failed, changed nothing, or changed too much."""
        self.run_result = run
        self.st.sandbox_id = run.sandbox_id
        self.st.summary = run.summary[:2000]
        self.st.outcome = run.outcome.value
        for line in run.egress[:50]:
            self.trail.record("egress", detail=line)
        if run.outcome != AgentOutcome.ok:
            self.trail.stage(Stage.agent_failed, f"{run.outcome.value}: {run.detail}".strip(": "))
            await self._notify("failed", f"The agent run stopped ({run.outcome.value}). {run.detail}")
            return False
        if run.patch is None:
            self.trail.stage(Stage.no_changes, "the agent made no changes")
            await self._notify("info", "The agent made no changes; nothing was opened.")
            return False
        if run.files_changed > req.repo.max_files_changed or run.lines_added + run.lines_removed > req.repo.max_diff_lines:
            self.trail.stage(
                Stage.too_large,
                f"{run.files_changed} files / {run.lines_added + run.lines_removed} lines changed; the limit is "
                f"{req.repo.max_files_changed} files / {req.repo.max_diff_lines} lines. Split the task into smaller ones.",
            )
            await self._notify("failed", self.st.detail)
            return False
        return True

    async def _publish(self, req: TaskRequest, context: ContextResult, run: AgentRunResult) -> bool:
        self.trail.stage(Stage.publishing)
        try:
            self.change = await workflow.execute_activity(
                "publish_change",
                PublishInput(
                    task_id=req.task_id,
                    run_id=workflow.info().run_id,
                    repo=req.repo,
                    base=req.base,
                    base_sha=context.base_sha,
                    text=req.text,
                    requester=req.requester,
                    origin=req.origin,
                    run=run,
                    context_warnings=context.warnings,
                    suggested_agents_md=context.suggested_agents_md,
                    follow_up_branch=req.follow_up_branch,
                ),
                result_type=ChangeRequest,
                start_to_close_timeout=timedelta(minutes=5),
                retry_policy=HOST_RETRY,
            )
        except ActivityError as err:
            self.trail.stage(Stage.failed, f"change refused: {failure_message(err)}")
            await self._notify("failed", self.st.detail)
            return False
        self.st.branch = self.change.branch
        self.st.change_url = self.change.url
        self.st.change_number = self.change.number
        self.st.head_sha = self.change.head_sha
        return True

    async def _run_agent(self, req: TaskRequest, context: ContextResult) -> AgentRunResult | None:
        """Run the agent; a cancel signal cancels the activity (the sandbox is killed). None = cancelled."""
        self.trail.stage(Stage.running)
        await self._notify("progress", "Agent running in the sandbox")
        handle = workflow.start_activity(
            "run_agent",
            AgentRunInput(
                task_id=req.task_id,
                repo=req.repo,
                base_sha=context.base_sha,
                text=req.text,
                agent=req.agent,
                context=context.document,
                follow_up_branch=req.follow_up_branch,
            ),
            result_type=AgentRunResult,
            start_to_close_timeout=timedelta(seconds=req.repo.sandbox.wall_clock_s + 600),
            heartbeat_timeout=AGENT_HEARTBEAT,
            retry_policy=AGENT_RETRY,
        )
        await workflow.wait_condition(lambda: handle.done() or self.cancellation is not None)
        if handle.done():
            return handle.result()
        handle.cancel()
        try:
            await handle
        except (ActivityError, BaseException):  # the cancellation itself surfaces here
            pass
        return None

    async def _review_gate(self, req: TaskRequest) -> bool:
        self.trail.stage(Stage.awaiting_review)
        await self._notify("review", "Ready for review")
        try:
            await workflow.wait_condition(
                lambda: self.approval is not None or self.rejection is not None or self.cancellation is not None,
                timeout=timedelta(seconds=req.repo.review_timeout_s),
            )
        except TimeoutError:
            self.trail.stage(Stage.expired, f"no review within {req.repo.review_timeout_s // 3600} h")
            await self._close("review timed out")
            await self._notify("failed", "No review arrived in time; the change was closed.")
            return False
        if self.cancellation:
            await self._cancelled()
            return False
        if self.rejection:
            self.trail.stage(Stage.rejected, self.rejection.reason)
            await self._close(f"rejected by {self.rejection.by}: {self.rejection.reason}")
            await self._notify("rejected", f"Rejected by {self.rejection.by}: {self.rejection.reason}")
            return False
        assert self.approval is not None and self.change is not None
        self.st.approved_head = self.change.head_sha
        return True

    async def _checks_gate(self, req: TaskRequest) -> bool:
        """Wait for the code host's required checks: durable timers or a checks_changed signal."""
        assert self.change is not None
        deadline = workflow.now() + timedelta(seconds=req.repo.checks_timeout_s)
        first = True
        while True:
            result: ChecksResult = await workflow.execute_activity(
                "check_change",
                ChecksInput(repo=req.repo, change=self.change),
                result_type=ChecksResult,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=HOST_RETRY,
            )
            if self.cancellation:  # accepted while the checks were being read: honour it, never merge
                await self._cancelled()
                return False
            if result.state == "green":
                return True
            if result.state == "failed":
                names = ", ".join(result.failing) or result.detail
                self.trail.stage(Stage.checks_failed, f"required checks failed: {names}")
                await self._notify("failed", self.st.detail)
                return False
            if first:
                self.trail.stage(Stage.awaiting_checks, result.detail)
                first = False
            remaining = deadline - workflow.now()
            if remaining <= timedelta(0):
                self.trail.stage(Stage.checks_failed, "required checks did not finish in time")
                await self._notify("failed", self.st.detail)
                return False
            self.checks_changed = False
            try:
                await workflow.wait_condition(
                    lambda: self.checks_changed or self.cancellation is not None,
                    timeout=min(CHECKS_POLL, remaining),
                )
            except TimeoutError:
                pass
            if self.cancellation:
                await self._cancelled()
                return False

    async def _merge(self, req: TaskRequest) -> bool:
        assert self.change is not None and self.approval is not None
        self.trail.stage(Stage.merging)
        result: MergeResult = await workflow.execute_activity(
            "merge_change",
            MergeInput(
                task_id=req.task_id,
                repo=req.repo,
                change=self.change,
                approved_head=self.st.approved_head,
                approved_by=self.approval.by,
            ),
            result_type=MergeResult,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=HOST_RETRY,
        )
        if result.outcome != "merged":
            stage = Stage.needs_rebase if result.outcome == "needs_rebase" else Stage.failed
            self.trail.stage(stage, result.detail or result.outcome)
            await self._notify("failed", f"Not merged ({result.outcome}): {result.detail}")
            return False
        self.st.merge_sha = result.merge_sha
        self.trail.stage(Stage.merged, result.merge_sha)
        await self._notify("merged", f"Merged as {result.merge_sha[:12]}")
        return True

    async def _revert_window(self, req: TaskRequest) -> None:
        """Stay open (and revertable by signal) for the window; after it, revert_task starts
        RevertTaskWorkflow instead."""
        try:
            await workflow.wait_condition(
                lambda: self.revert_request is not None, timeout=timedelta(seconds=req.repo.revert_window_s)
            )
        except TimeoutError:
            return
        assert self.revert_request is not None
        self.trail.stage(Stage.reverting)
        result = await revert(req.task_id, req.repo, req.base, self.st.merge_sha, self.change, self.revert_request)
        if result.pending_review:  # the code host opened the revert for review instead of landing it
            self.trail.stage(Stage.merged, f"revert opened for review: {result.url} {result.detail}".strip())
            await self._notify("info", f"Revert requested by {self.revert_request.by} is open for review: {result.url}")
            return
        self.st.revert_sha = result.revert_sha
        self.trail.stage(Stage.reverted, result.url or result.revert_sha)
        await self._notify("reverted", f"Reverted by {self.revert_request.by}: {result.url or result.revert_sha[:12]}")

    # ---- helpers -----------------------------------------------------------------------

    async def _cancelled(self) -> None:
        assert self.cancellation is not None
        self.trail.stage(Stage.cancelled, f"cancelled by {self.cancellation.by}")
        await self._close(f"cancelled by {self.cancellation.by}")
        await self._notify("info", f"Cancelled by {self.cancellation.by}.")

    async def _close(self, reason: str) -> None:
        if self.change is None:
            return
        await workflow.execute_activity(
            "close_change",
            CloseInput(repo=self.req.repo, change=self.change, reason=reason),
            start_to_close_timeout=timedelta(minutes=1),
            retry_policy=HOST_RETRY,
        )

    async def _notify(self, kind: str, text: str) -> None:
        """Tell the requester. Best effort: a notifier outage never fails the task."""
        notice = Notice(
            task_id=self.req.task_id,
            kind=kind,  # type: ignore[arg-type]
            stage=self.st.stage,
            text=text,
            requester=self.req.requester,
            origin=self.req.origin,
            repo=self.req.repo.name,
            change=self.change,
            run=self.run_result,
            decided_by=str(self.approval.by if self.approval else self.rejection.by if self.rejection else ""),
            refs=self.refs,
            warnings=self.st.warnings,
        )
        self.refs.update(await notify(notice, self.trail))

    # ---- signals and query -------------------------------------------------------------

    def _refuse(self, action: str, decision: Decision, why: str) -> None:
        self.trail.record("refused", decision.by, via=decision.via, detail=f"{action}: {why}")

    def _allowed(self, role: str, decision: Decision) -> bool:
        return self.req.repo.allows(role, decision.by.principal, decision.by.id)  # type: ignore[arg-type]

    @workflow.signal
    def approve(self, decision: Decision) -> None:
        if not self._allowed("approvers", decision):
            return self._refuse("approve", decision, "not an approver for this repository")
        if self.req.repo.approver_must_differ and decision.by.principal == self.req.requester.principal:
            return self._refuse("approve", decision, "the requester may not approve their own task")
        if self.approval is not None:
            return self.trail.record("ignored", decision.by, decision.via, "approve: already approved")
        if self.rejection is not None or self.cancellation is not None or self.st.stage in TERMINAL:
            return self.trail.record("ignored", decision.by, decision.via, f"approve: task is {self.st.stage.value}")
        if self.st.stage != Stage.awaiting_review or self.change is None:
            return self._refuse("approve", decision, f"nothing to approve yet (stage {self.st.stage.value})")
        if decision.head_sha and decision.head_sha != self.change.head_sha:
            return self._refuse(
                "approve", decision, f"reviewed head {decision.head_sha[:12]} is not the change's head {self.change.head_sha[:12]}"
            )
        self.approval = decision
        self.trail.record("approved", decision.by, decision.via, decision.reason)

    @workflow.signal
    def reject(self, decision: Decision) -> None:
        if not self._allowed("approvers", decision):
            return self._refuse("reject", decision, "not an approver for this repository")
        if not decision.reason.strip():
            return self._refuse("reject", decision, "a reason is required")
        if self.approval is not None or self.rejection is not None or self.st.stage in TERMINAL:
            return self.trail.record("ignored", decision.by, decision.via, f"reject: task is {self.st.stage.value}")
        if self.st.stage != Stage.awaiting_review:
            return self._refuse("reject", decision, f"nothing to reject yet (stage {self.st.stage.value})")
        self.rejection = decision
        self.trail.record("rejected", decision.by, decision.via, decision.reason)

    @workflow.signal
    def cancel(self, decision: Decision) -> None:
        is_requester = decision.by.principal == self.req.requester.principal
        if not (is_requester or self._allowed("approvers", decision)):
            return self._refuse("cancel", decision, "only the requester or an approver may cancel")
        if self.cancellation is not None or self.st.stage in TERMINAL:
            return self.trail.record("ignored", decision.by, decision.via, f"cancel: task is {self.st.stage.value}")
        if self.st.stage in (Stage.merging, Stage.merged, Stage.reverting):
            return self._refuse("cancel", decision, "already merging or merged: use revert")
        self.cancellation = decision
        self.trail.record("cancelled", decision.by, decision.via, decision.reason)

    @workflow.signal
    def revert(self, decision: Decision) -> None:
        if not self._allowed("reverters", decision):
            return self._refuse("revert", decision, "not a reverter for this repository")
        if self.revert_request is not None:
            return self.trail.record("ignored", decision.by, decision.via, "revert: already requested")
        if self.st.stage not in (Stage.merging, Stage.merged):
            return self._refuse("revert", decision, f"nothing merged to revert (stage {self.st.stage.value})")
        self.revert_request = decision
        self.trail.record("revert_requested", decision.by, decision.via, decision.reason)

    @workflow.signal
    def checks_changed(self, decision: Decision) -> None:
        self.checks_changed = True

    @workflow.query
    def status(self) -> TaskStatus:
        return self.trail.status


async def notify(notice: Notice, trail: AuditTrail) -> dict[str, str]:
    """Tell the requester. Best effort: a notifier outage never fails the task."""
    try:
        refs = await workflow.execute_activity(
            "notify",
            notice,
            result_type=dict[str, str],
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=NOTIFY_RETRY,
        )
        return refs or {}
    except ActivityError as err:
        trail.record("notify_failed", detail=failure_message(err))
        return {}


async def revert(
    task_id: str, repo, base: str, merge_sha: str, change: ChangeRequest | None, decision: Decision
) -> RevertResult:
    return await workflow.execute_activity(
        "revert_change",
        RevertInput(task_id=task_id, repo=repo, base=base, merge_sha=merge_sha, change=change, decision=decision),
        result_type=RevertResult,
        start_to_close_timeout=timedelta(minutes=5),
        retry_policy=HOST_RETRY,
    )


@workflow.defn(name="RevertTaskWorkflow")
class RevertTaskWorkflow:
    """Revert a task after its workflow closed. Its id is `<task_id>-revert`, so two reverts are one."""

    @workflow.init
    def __init__(self, req: RevertRequest) -> None:
        original = req.original or TaskStatus(
            task_id=req.task_id, repo=req.repo.name, base=req.base, text="", requester="", source="", stage=Stage.merged
        )
        self.trail = AuditTrail(original.model_copy(deep=True))

    @workflow.run
    async def run(self, req: RevertRequest) -> TaskResult:
        decision = req.decision
        if not req.repo.allows("reverters", decision.by.principal, decision.by.id):
            # Fail (not complete) so that an authorized revert can still start under the same id.
            raise ApplicationError(f"{decision.by} is not a reverter for {req.repo.name}", type="Refused", non_retryable=True)
        self.trail.record("revert_requested", decision.by, decision.via, decision.reason)
        self.trail.status.stage = Stage.reverting
        result = await revert(req.task_id, req.repo, req.base, req.merge_sha, req.change, decision)
        if result.pending_review:
            self.trail.status.stage = Stage.merged
            self.trail.record("stage", detail=f"revert opened for review: {result.url} {result.detail}".strip())
            return TaskResult(status=self.trail.status, repo=req.repo, requester=req.requester, origin=req.origin)
        self.trail.status.revert_sha = result.revert_sha
        self.trail.status.stage = Stage.reverted
        self.trail.record("stage", detail=f"reverted: {result.url or result.revert_sha}")
        if req.requester and req.origin:
            await notify(
                Notice(
                    task_id=req.task_id,
                    kind="reverted",
                    stage=Stage.reverted,
                    text=f"Reverted by {decision.by}: {result.url or result.revert_sha[:12]}",
                    requester=req.requester,
                    origin=req.origin,
                    repo=req.repo.name,
                    change=req.change,
                    refs=req.refs,
                ),
                self.trail,
            )
        return TaskResult(status=self.trail.status, repo=req.repo, requester=req.requester, origin=req.origin)

    @workflow.query
    def status(self) -> TaskStatus:
        return self.trail.status
