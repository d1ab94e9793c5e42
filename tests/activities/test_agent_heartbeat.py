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
