"""A model agent (Claude Code's headless CLI, here its faithful fake) through the whole pipeline,
inside the real sandbox: the model key stays on the worker, the budget is enforced."""

from __future__ import annotations

from pathlib import Path

from conveyor.models import Stage
from tests.conftest import decision, git, running_worker, start, wait_stage
from triggers import service

FAKES = Path(__file__).resolve().parents[1] / "fakes"
SECRET = "sk-ant-test-never-in-the-sandbox"


def model_agent_policy(policy, monkeypatch, scenario: str = "ok"):
    monkeypatch.setenv("CONVEYOR_CLAUDE_BIN", str(FAKES / "claude"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    policy.agent = "claude-code"
    policy.sandbox.tool_paths = [str(FAKES)]
    policy.sandbox.secrets = ["ANTHROPIC_API_KEY"]
    policy.sandbox.env = {"FAKE_AGENT_SCENARIO": scenario}
    return policy


async def test_claude_code_change_reaches_review_with_its_reasoning(client, settings, policy, bare_repo, monkeypatch):
    policy = model_agent_policy(policy, monkeypatch)
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "Add the file the team asked for")
        status = await wait_stage(client, task_id, Stage.awaiting_review, Stage.agent_failed, Stage.failed)
        assert status.stage == Stage.awaiting_review, status.detail
        await service.signal_task(client, task_id, "approve", decision("carol"))
        status = await wait_stage(client, task_id, Stage.merged)
    assert "Added CHANGED_BY_AGENT.txt" in status.summary
    assert git(bare_repo, "show", "main:CHANGED_BY_AGENT.txt") == "fixed by fake claude"
    record = next((settings.home / "changes").rglob("*.json")).read_text()
    assert "Agent `claude-code`" in record and "4 turns, cost $0.04" in record  # cost and turns parsed from stream-json reach the change body
    for blob in settings.artifacts_dir.rglob("*"):
        if blob.is_file():
            assert SECRET.encode() not in blob.read_bytes(), f"the model key leaked into artifact {blob}"


async def test_turn_budget_is_a_distinct_outcome(client, settings, policy, bare_repo, monkeypatch):
    policy = model_agent_policy(policy, monkeypatch, scenario="loop")
    policy.max_turns = 3
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "Make the tests pass")
        status = await wait_stage(client, task_id, Stage.agent_failed, Stage.failed)
    assert status.stage == Stage.agent_failed and status.outcome == "budget", status.detail
    assert "conveyor/" not in git(bare_repo, "branch", "--list")
