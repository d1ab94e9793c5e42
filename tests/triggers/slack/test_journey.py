"""One full journey through Slack payloads alone, with the real worker (local git code host,
`command` agent in the local sandbox): /agent -> change opened -> Approve -> merged ->
/agent revert -> reverted."""

from __future__ import annotations

import asyncio
import json
import time

from conveyor.config import ConveyorConfig, RepoPolicy, Settings
from conveyor.models import Stage
from tests.emulators.slack_api import SlackWebAPI
from tests.triggers.slack.conftest import serve_rig
from triggers import service

from tests import conftest


async def _wait_stage(client, task_id: str, stage: Stage, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = await service.task_status(client, task_id)
        if status.stage == stage:
            return status
        if status.stage.value in {"failed", "agent_failed", "rejected", "no_changes", "too_large"}:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"{task_id} is {status.stage if status else None} ({status.detail if status else ''}), expected {stage}")


async def test_slack_journey_agent_approve_merge_revert(temporal_env, settings: Settings, bare_repo, slack_api: SlackWebAPI) -> None:
    policy = RepoPolicy(
        name="demo",
        url=str(bare_repo),
        invokers=["U100"],
        approvers=["U200"],
        reverters=["slack:U300"],
        approver_must_differ=True,
        slack_channels=["C100"],
        sandbox={"wall_clock_s": 60, "memory_mb": 512, "pids": 128},
    )
    config = ConveyorConfig(repos={"demo": policy})
    readme_before = conftest.git(bare_repo, "show", "main:README.md")
    client = temporal_env.client
    async with conftest.running_worker(client, settings), serve_rig(client, settings, config, slack_api) as rig:
        body, form = rig.sender.slash_body("echo hi >> README.md", user="U100", channel="C100")
        ack = await rig.post(body, "application/x-www-form-urlencoded")
        assert ack.status == 200 and ack.elapsed_s < 1.0
        task_id = service.task_id_for("slack", form["trigger_id"])

        # change opened: the review message arrives in the thread with the change's head sha
        def review():
            for m in slack_api.messages.get("C100", []):
                meta = m.get("metadata") or {}
                if meta.get("event_type") == "conveyor_review" and meta["event_payload"]["task_id"] == task_id:
                    return m
            return None

        msg = await slack_api.await_for(review, timeout=60, what="the review message")
        status = await service.task_status(client, task_id)
        assert status.stage == Stage.awaiting_review and status.head_sha
        approve = [el for b in msg["blocks"] if b["type"] == "actions" for el in b["elements"] if el["action_id"] == "conveyor_approve"][0]
        assert json.loads(approve["value"]) == {"task_id": task_id, "head_sha": status.head_sha}

        click = await rig.click("conveyor_approve", approve["value"], user="U200", user_name="bob", message_ts=msg["ts"], message=msg)
        assert click.status == 200
        merged = await _wait_stage(client, task_id, Stage.merged)
        readme = conftest.git(bare_repo, "show", "main:README.md")
        assert readme.splitlines() == readme_before.splitlines() + ["hi"]  # the agent's change, merged
        assert merged.approved_head == status.head_sha

        await rig.slash(f"revert {task_id} on-call drill", user="U300", channel="C100")
        reverted = await _wait_stage(client, task_id, Stage.reverted)
        assert conftest.git(bare_repo, "show", "main:README.md") == readme_before
        assert reverted.revert_sha
        posted = await slack_api.await_for(
            lambda: [m for m in slack_api.thread("C100", msg["thread_ts"]) if reverted.revert_sha[:12] in m.get("text", "")],
            timeout=20, what="the revert commit in the thread",
        )
        assert "Reverted by carol" in posted[0]["text"]
        decided = slack_api.message("C100", msg["ts"])
        assert not [b for b in decided["blocks"] if b["type"] == "actions"]
        assert "Approved by <@U200>" in json.dumps(decided["blocks"])
        progress = [m for m in slack_api.thread("C100", msg["thread_ts"]) if (m.get("metadata") or {}).get("event_type") == "conveyor_progress"]
        assert len(progress) == 1 and "Reverted" in progress[0]["blocks"][0]["text"]["text"]
