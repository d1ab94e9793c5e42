"""The whole pipeline with host = "github": the real workflow and activities on a real dev server,
the GitHub emulator behind PyGithub and git smart HTTP, CI reported through the signed webhook
receiver while the task waits."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from conveyor.config import ConveyorConfig, RepoPolicy
from conveyor.models import Stage
from tests.conftest import decision, git, running_worker, start, wait_stage
from tests.emulators.github_api import GitHubEmulator, github_emulator, push_commit  # noqa: F401
from triggers import service
from triggers.github_webhooks import GitHubWebhooks, sign

CHANGE = "sed -i 's/^RETRIES = .*/RETRIES = 3/' app/config.py && echo 'raised retries' > \"$CONVEYOR_SUMMARY_FILE\""
SECRET = "pipeline-secret"


@pytest.fixture
def gh_policy(policy: RepoPolicy, bare_repo: Path, github_emulator: GitHubEmulator,
              monkeypatch: pytest.MonkeyPatch) -> RepoPolicy:
    emu = github_emulator
    emu.add_token("ghp_pipeline")
    emu.add_repo("acme", "demo", bare_repo)
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_pipeline")
    monkeypatch.setenv("GITHUB_API_URL", emu.api_url)
    monkeypatch.setenv("CONVEYOR_GITHUB_PACING", "0,0")
    return policy.model_copy(update={"host": "github", "url": emu.repo_url("acme", "demo"),
                                     "required_checks": ["ci/test"], "checks_timeout_s": 120})


async def deliver_check_run(client, settings, policy: RepoPolicy, branch: str, sha: str, conclusion: str) -> dict:
    hooks = GitHubWebhooks(settings, ConveyorConfig(repos={policy.name: policy}), client, SECRET)
    server = TestServer(hooks.app(), host="127.0.0.1")
    await server.start_server()
    payload = {"action": "completed", "repository": {"html_url": policy.url, "full_name": "acme/demo"},
               "check_run": {"name": "ci/test", "status": "completed", "conclusion": conclusion, "head_sha": sha,
                             "check_suite": {"head_branch": branch}, "pull_requests": []}}
    body = json.dumps(payload).encode()
    headers = {"X-GitHub-Event": "check_run", "X-GitHub-Delivery": str(uuid.uuid4()),
               "X-Hub-Signature-256": sign(SECRET, body), "Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.make_url("/github/webhooks"), data=body, headers=headers) as resp:
                return await resp.json()
    finally:
        await server.close()


async def test_github_pipeline_ci_gate_merge_revert(client, settings, gh_policy, bare_repo,
                                                    github_emulator: GitHubEmulator) -> None:
    emu = github_emulator
    async with running_worker(client, settings):
        task_id = await start(client, settings, gh_policy, CHANGE)
        status = await wait_stage(client, task_id, Stage.awaiting_review, timeout=90)
        pr = emu.pull("acme", "demo", status.change_number)
        assert pr.head == status.branch and "conveyor" in pr.labels and status.change_url.endswith(f"/pull/{pr.number}")
        await service.signal_task(client, task_id, "approve", decision("alice", head_sha=status.head_sha))
        await wait_stage(client, task_id, Stage.awaiting_checks)
        emu.set_check(status.head_sha, "ci/test", "success")
        answer = await deliver_check_run(client, settings, gh_policy, status.branch, status.head_sha, "success")
        assert answer == {"result": "signalled", "task_ids": [task_id]}
        status = await wait_stage(client, task_id, Stage.merged, timeout=60)
        assert git(bare_repo, "rev-parse", "main") == status.merge_sha
        assert git(bare_repo, "show", "main:app/config.py").endswith("RETRIES = 3")
        assert emu.branch_sha("acme", "demo", status.branch) is None
        await service.revert_task(client, task_id, decision("alice", emergency=True), settings)
        status = await wait_stage(client, task_id, Stage.reverted, timeout=60)
    assert "RETRIES = 3" not in git(bare_repo, "show", "main:app/config.py")


async def test_github_pipeline_failing_checks_and_moved_head(client, settings, gh_policy, bare_repo, tmp_path,
                                                             github_emulator: GitHubEmulator) -> None:
    emu = github_emulator
    async with running_worker(client, settings):
        failing = await start(client, settings, gh_policy, CHANGE)
        status = await wait_stage(client, failing, Stage.awaiting_review, timeout=90)
        emu.set_check(status.head_sha, "ci/test", "failure", url="https://ci.example.com/run/41")
        await service.signal_task(client, failing, "approve", decision("alice", head_sha=status.head_sha))
        status = await wait_stage(client, failing, Stage.checks_failed, timeout=60)
        assert "ci/test: https://ci.example.com/run/41" in status.detail
        assert emu.pull("acme", "demo", status.change_number).merged is False

        moved = await start(client, settings, gh_policy.model_copy(update={"required_checks": []}), CHANGE)
        status = await wait_stage(client, moved, Stage.awaiting_review, timeout=90)
        approved = status.head_sha
        push_commit(bare_repo, status.branch, {"sneaky.txt": "unreviewed\n"}, "unreviewed push", tmp_path)
        await service.signal_task(client, moved, "approve", decision("alice", head_sha=approved))
        status = await wait_stage(client, moved, Stage.failed, Stage.needs_rebase, timeout=60)
        assert "head_moved" in status.detail or "approved" in status.detail
    assert "sneaky.txt" not in git(bare_repo, "ls-tree", "--name-only", "main")
