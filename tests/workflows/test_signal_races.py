"""Signals that land while an activity is in flight: what the workflow accepted, it honours."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import activity
from temporalio.worker import Worker

from activities import build_activities
from conveyor.models import ChecksInput, ChecksResult, Stage
from tests.conftest import decision, git, running_worker, start, wait_audit, wait_stage
from triggers import service
from workers.main import WORKFLOWS


async def test_cancel_accepted_while_checks_are_read_is_honoured(client, settings, policy, bare_repo):
    """Approve, then cancel while check_change runs: the cancel was accepted (audit says so),
    so the task must end cancelled, not merge when the checks come back green."""
    entered, release = asyncio.Event(), asyncio.Event()

    @activity.defn(name="check_change")
    async def slow_checks(inp: ChecksInput) -> ChecksResult:
        entered.set()
        await release.wait()
        return ChecksResult(state="green", detail="all green")

    acts = [a for a in build_activities(settings) if activity._Definition.from_callable(a).name != "check_change"]
    base = git(bare_repo, "rev-parse", "main")
    async with Worker(client, task_queue=settings.task_queue, workflows=WORKFLOWS, activities=[*acts, slow_checks],
                      graceful_shutdown_timeout=timedelta(seconds=2)):
        task_id = await start(client, settings, policy, "echo change >> README.md")
        status = await wait_stage(client, task_id, Stage.awaiting_review)
        await service.signal_task(client, task_id, "approve", decision("carol", head_sha=status.head_sha))
        await asyncio.wait_for(entered.wait(), 20)
        await service.signal_task(client, task_id, "cancel", decision("alice", reason="changed my mind"))
        await wait_audit(client, task_id, "cancelled")
        release.set()
        status = await wait_stage(client, task_id, Stage.cancelled, Stage.merged)
    assert status.stage == Stage.cancelled
    assert git(bare_repo, "rev-parse", "main") == base


async def test_cancelled_in_temporal_closes_the_open_change(client, settings, policy, bare_repo):
    """A cancel from Temporal itself (UI, CLI) rather than the cancel signal still closes the change."""
    import json

    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "echo change >> README.md")
        await wait_stage(client, task_id, Stage.awaiting_review)
        await client.get_workflow_handle(task_id).cancel()
        for _ in range(200):
            records = [json.loads(p.read_text()) for p in (settings.home / "changes").rglob("*.json")]
            if records and records[0]["state"] != "open":
                break
            await asyncio.sleep(0.05)
        status = await service.task_status(client, task_id)  # answered from history by the worker
    assert len(records) == 1 and records[0]["state"] == "closed", records
    assert status.stage == Stage.cancelled and status.detail == "cancelled in Temporal"
