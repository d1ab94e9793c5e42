"""The whole pipeline on a real dev server, real git, real bubblewrap: run -> review -> merge -> revert."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from conveyor.models import Stage
from tests.conftest import decision, git, running_worker, start, wait_audit, wait_stage
from triggers import service

CHANGE = "sed -i 's/^RETRIES = .*/RETRIES = 3/' app/config.py && echo 'raised retries' > \"$CONVEYOR_SUMMARY_FILE\""


async def test_run_approve_merge_with_attribution(client, settings, policy, bare_repo):
    base_before = git(bare_repo, "rev-parse", "main")
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, CHANGE)
        status = await wait_stage(client, task_id, Stage.awaiting_review)
        assert status.branch.startswith(f"conveyor/{task_id}-")
        assert status.head_sha == git(bare_repo, "rev-parse", status.branch)
        assert status.summary == "raised retries"
        await service.signal_task(client, task_id, "approve", decision("alice", head_sha=status.head_sha))
        status = await wait_stage(client, task_id, Stage.merged)

    merge = git(bare_repo, "rev-parse", "main")
    assert merge == status.merge_sha
    parents = git(bare_repo, "rev-list", "--parents", "-n1", merge).split()[1:]
    assert parents == [base_before, status.head_sha]
    assert git(bare_repo, "show", "main:app/config.py").endswith("RETRIES = 3")
    message = git(bare_repo, "log", "-1", "--format=%B", status.head_sha)
    assert "Co-authored-by: Alice <local-alice@users.noreply.conveyor>" in message
    assert f"Conveyor-Task: {task_id}" in message
    assert f"Conveyor-Run: http://127.0.0.1:8233/namespaces/default/workflows/{task_id}/" in message
    assert git(bare_repo, "log", "-1", "--format=%an", status.head_sha) == "Conveyor"
    assert "Approved-by: local:alice" in git(bare_repo, "log", "-1", "--format=%B", merge)
    actions = [e.action for e in status.audit]
    assert actions[0] == "invoked" and "approved" in actions


async def test_reject_closes_the_change_and_leaves_base(client, settings, policy, bare_repo):
    base_before = git(bare_repo, "rev-parse", "main")
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, CHANGE)
        await wait_stage(client, task_id, Stage.awaiting_review)
        await service.signal_task(client, task_id, "reject", decision("carol", reason=""))
        await wait_audit(client, task_id, "refused")  # a reason is required
        await service.signal_task(client, task_id, "reject", decision("carol", reason="wrong approach"))
        status = await wait_stage(client, task_id, Stage.rejected)
        # approve after reject is harmless
        await service.signal_task(client, task_id, "approve", decision("alice"))
    assert git(bare_repo, "rev-parse", "main") == base_before
    assert status.detail == "wrong approach"
    records = list((settings.home / "changes").rglob("*.json"))
    assert len(records) == 1 and '"state": "closed"' in records[0].read_text()


async def test_no_changes_opens_nothing(client, settings, policy, bare_repo):
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "true")
        status = await wait_stage(client, task_id, Stage.no_changes)
    assert status.branch == ""
    assert "conveyor/" not in git(bare_repo, "branch", "--list")


async def test_cancel_while_running_kills_the_sandbox(client, settings, policy, bare_repo):
    marker = f"conveyor-cancel-marker-{uuid.uuid4().hex[:12]}"
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, f"sleep 30 # {marker}")
        await wait_stage(client, task_id, Stage.running)
        await asyncio.sleep(1.0)
        await service.signal_task(client, task_id, "cancel", decision("bob"))  # bob may not cancel alice's task
        await wait_audit(client, task_id, "refused")
        await service.signal_task(client, task_id, "cancel", decision("alice"))
        status = await wait_stage(client, task_id, Stage.cancelled, timeout=20)
    assert "cancelled by Alice" in status.detail
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps, "the agent process outlived the cancel"
    assert "conveyor/" not in git(bare_repo, "branch", "--list")


async def test_signals_checked_against_policy(client, settings, policy, bare_repo):
    policy.approver_must_differ = True
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, CHANGE)
        status = await wait_stage(client, task_id, Stage.awaiting_review)
        await service.signal_task(client, task_id, "approve", decision("mallory"))
        await service.signal_task(client, task_id, "approve", decision("alice"))  # requester, must differ
        await service.signal_task(client, task_id, "approve", decision("carol", head_sha="0" * 40))  # stale head
        status = await wait_audit(client, task_id, "refused", count=3)
        assert status.stage == Stage.awaiting_review
        refusals = [e.detail for e in status.audit if e.action == "refused"]
        assert "approve: not an approver for this repository" in refusals
        assert "approve: the requester may not approve their own task" in refusals
        assert any("is not the change's head" in r for r in refusals)
        await service.signal_task(client, task_id, "approve", decision("carol"))
        await service.signal_task(client, task_id, "approve", decision("carol"))  # duplicate: harmless
        status = await wait_stage(client, task_id, Stage.merged)
        await service.signal_task(client, task_id, "revert", decision("mallory", reason="nope"))
        status = await wait_audit(client, task_id, "refused", count=4)
    assert status.stage == Stage.merged
    assert status.audit[-1].detail == "revert: not a reverter for this repository"
    assert status.audit[-1].by == "Mallory"
    # the display name is the user's to choose; the trail also keeps who policy saw
    assert status.audit[-1].principal == "local:mallory"
    assert {e.principal for e in status.audit if e.action == "approved"} == {"local:carol"}
    assert len([c for c in git(bare_repo, "log", "--merges", "--format=%H", "main").split() if c]) == 1


async def test_revert_inside_window_twice_is_one_revert(client, settings, policy, bare_repo):
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, CHANGE)
        status = await wait_stage(client, task_id, Stage.awaiting_review)
        await service.signal_task(client, task_id, "approve", decision("carol"))
        status = await wait_stage(client, task_id, Stage.merged)
        assert await service.revert_task(client, task_id, decision("oncall", reason="pager"), settings) == "signalled"
        status = await wait_stage(client, task_id, Stage.reverted)
        again = await service.revert_task(client, task_id, decision("oncall", reason="again"), settings)
        assert again in ("signalled", "already")
        await asyncio.sleep(0.5)
    assert git(bare_repo, "rev-parse", "main") == status.revert_sha
    assert git(bare_repo, "show", "main:app/config.py").endswith("RETRIES = 1")
    message = git(bare_repo, "log", "-1", "--format=%B", "main")
    assert f"This reverts merge {status.merge_sha}." in message
    assert "Reverted-by: local:oncall via test" in message and "Reason: pager" in message
    assert message.count("Conveyor-Reverts") == 1
    assert len(git(bare_repo, "log", "--format=%H", "-F", f"--grep=Conveyor-Reverts: {task_id}", "main").split()) == 1


async def test_revert_after_close_lands(client, settings, policy, bare_repo):
    policy.revert_window_s = 1
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, CHANGE)
        await wait_stage(client, task_id, Stage.awaiting_review)
        await service.signal_task(client, task_id, "approve", decision("alice"))
        await client.get_workflow_handle(task_id).result()
        with pytest.raises(service.TaskClosed):
            await service.signal_task(client, task_id, "approve", decision("alice"))  # late signal: clear error
        with pytest.raises(service.Refused):
            await service.revert_task(client, task_id, decision("mallory", reason="nope"), settings)
        assert await service.revert_task(client, task_id, decision("oncall", reason="late"), settings) == "started"
        await client.get_workflow_handle(f"{task_id}-revert").result()
        assert await service.revert_task(client, task_id, decision("oncall"), settings) == "already"
        status = await service.task_status(client, task_id)
    assert status.stage == Stage.reverted
    assert git(bare_repo, "rev-parse", "main") == status.revert_sha
    assert git(bare_repo, "show", "main:app/config.py").endswith("RETRIES = 1")


async def test_change_over_the_scope_cap_is_too_large(client, settings, policy, bare_repo):
    policy.max_files_changed = 1
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "echo a > one.txt && echo b > two.txt")
        status = await wait_stage(client, task_id, Stage.too_large)
    assert "2 files" in status.detail and "Split the task" in status.detail
    assert "conveyor/" not in git(bare_repo, "branch", "--list")
    assert not (settings.home / "changes").exists() or not list((settings.home / "changes").rglob("*.json"))


async def test_agent_summary_is_stripped_of_terminal_escapes(client, settings, policy):
    text = "echo x >> README.md && printf 'done \\033[2J\\033]0;pwned\\007 ok' > \"$CONVEYOR_SUMMARY_FILE\""
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, text)
        status = await wait_stage(client, task_id, Stage.awaiting_review)
    assert "\x1b" not in status.summary and "\x07" not in status.summary
    assert status.summary.startswith("done") and status.summary.endswith("ok")
