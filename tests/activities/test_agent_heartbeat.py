"""run_agent heartbeats from its first second: preparing the workspace of a big repository takes
longer than the workflow's heartbeat timeout (5 s), and silence there times the attempt out."""

from __future__ import annotations

import time

from adapters.codehost.local_git import LocalGitCodeHost
from conveyor.models import Stage
from tests.conftest import running_worker, start, wait_stage

SLOW_CHECKOUT_S = 7.0  # over the 5 s heartbeat timeout


async def test_slow_checkout_does_not_time_out_the_agent_run(client, settings, policy, monkeypatch):
    original = LocalGitCodeHost.checkout

    def slow_checkout(self, repo, sha, dest):
        time.sleep(SLOW_CHECKOUT_S)  # runs in a worker thread, like a 20k-file checkout
        return original(self, repo, sha, dest)

    monkeypatch.setattr(LocalGitCodeHost, "checkout", slow_checkout)
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "echo change >> README.md")
        status = await wait_stage(client, task_id, Stage.awaiting_review, Stage.failed, Stage.agent_failed, timeout=40)
    assert status.stage == Stage.awaiting_review, status.detail


async def test_busy_workspaces_are_waited_for_not_failed(client, settings, policy):
    """More concurrent tasks than warm slots: the extra run waits for a slot (heartbeating)
    instead of failing its few attempts within seconds."""
    import asyncio
    import fcntl

    from activities.agent import MAX_SLOTS
    from activities.base import Deps

    root = settings.workspaces_dir / Deps(settings).repo_key(policy)
    root.mkdir(parents=True, exist_ok=True)
    held = []
    for slot in range(MAX_SLOTS):  # another worker's runs hold every slot
        fh = open(root / f"slot-{slot}.lock", "w")
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fh)
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "echo change >> README.md")
        await wait_stage(client, task_id, Stage.running)
        await asyncio.sleep(5)  # longer than all of the run's retries take to fail
        for fh in held:
            fh.close()
        status = await wait_stage(client, task_id, Stage.awaiting_review, Stage.failed, Stage.agent_failed, timeout=40)
    assert status.stage == Stage.awaiting_review, status.detail


async def test_cancel_during_checkout_keeps_the_slot_until_git_is_done(client, settings, policy, monkeypatch):
    import asyncio
    import fcntl
    import threading

    from activities.base import Deps
    from tests.conftest import decision
    from triggers import service

    original = LocalGitCodeHost.checkout
    started, finished = threading.Event(), threading.Event()

    def slow_checkout(self, repo, sha, dest):
        started.set()
        time.sleep(8.0)  # longer than a cancel takes to reach the activity (heartbeats are throttled)
        try:
            return original(self, repo, sha, dest)
        finally:
            finished.set()

    monkeypatch.setattr(LocalGitCodeHost, "checkout", slow_checkout)
    lock_path = settings.workspaces_dir / Deps(settings).repo_key(policy) / "slot-0.lock"
    grabbed_early = False
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "echo change >> README.md")
        while not started.is_set():
            await asyncio.sleep(0.05)
        await service.signal_task(client, task_id, "cancel", decision("alice"))
        await wait_stage(client, task_id, Stage.cancelled)
        while not finished.is_set():  # while git still writes into slot 0, nobody else may take it
            with open(lock_path, "w") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    grabbed_early = not finished.is_set()
                    break
                except BlockingIOError:
                    pass
            await asyncio.sleep(0.05)
    assert not grabbed_early, "the slot was released while the checkout thread was still writing"
