"""The whole pipeline with host = "github": the real workflow and activities on a real dev server,
the GitHub emulator behind PyGithub and git smart HTTP, CI reported while the task waits."""

from __future__ import annotations

import pytest

from conveyor.models import Stage
from tests.conftest import decision, git, running_worker, start, wait_stage
from tests.emulators.github_api import GitHubEmulator, github_emulator  # noqa: F401
from triggers import service

CHANGE = "sed -i 's/^RETRIES = .*/RETRIES = 3/' app/config.py && echo 'raised retries' > \"$CONVEYOR_SUMMARY_FILE\""


async def test_github_pipeline_ci_gate_merge_revert(client, settings, policy, bare_repo, github_emulator: GitHubEmulator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    emu = github_emulator
    emu.add_token("ghp_pipeline")
    emu.add_repo("acme", "demo", bare_repo)
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_pipeline")
    monkeypatch.setenv("GITHUB_API_URL", emu.api_url)
    monkeypatch.setenv("CONVEYOR_GITHUB_PACING", "0,0")
    gh_policy = policy.model_copy(update={"host": "github", "url": emu.repo_url("acme", "demo"),
                                          "required_checks": ["ci/test"], "checks_timeout_s": 120})
    async with running_worker(client, settings):
        task_id = await start(client, settings, gh_policy, CHANGE)
        status = await wait_stage(client, task_id, Stage.awaiting_review, timeout=90)
        pr = emu.pull("acme", "demo", status.change_number)
        assert pr.head == status.branch and "conveyor" in pr.labels
        await service.signal_task(client, task_id, "approve", decision("alice", head_sha=status.head_sha))
        await wait_stage(client, task_id, Stage.awaiting_checks)
        emu.set_check(status.head_sha, "ci/test", "success")
        await service.signal_task(client, task_id, "checks_changed", decision("alice"))
        status = await wait_stage(client, task_id, Stage.merged, timeout=60)
        assert git(bare_repo, "rev-parse", "main") == status.merge_sha
        assert git(bare_repo, "show", "main:app/config.py").endswith("RETRIES = 3")
        await service.revert_task(client, task_id, decision("alice", emergency=True), settings)
        status = await wait_stage(client, task_id, Stage.reverted, timeout=60)
    assert "RETRIES = 3" not in git(bare_repo, "show", "main:app/config.py")
