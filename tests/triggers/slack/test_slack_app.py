"""The bolt app over real HTTP with real signatures, against the Slack Web API emulator and a real
Temporal dev server running the real AgentTaskWorkflow (stand-in code host and agent)."""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest
from temporalio.client import WorkflowExecutionStatus

from conveyor.models import Stage, TaskRequest
from tests.emulators.slack_api import sign
from tests.triggers.slack.conftest import SIGNING_SECRET, SlackRig
from triggers import service
from triggers.slack_app import lazy_client_provider

ACK_BUDGET_S = 1.0  # Slack allows 3 s; we answer long before the workflow starts


def _roots(rig: SlackRig, channel: str = "C100") -> list[dict]:
    return [c.args for c in rig.api.calls_of("chat.postMessage") if c.args.get("channel") == channel and not c.args.get("thread_ts")]


async def _workflow_ids(rig: SlackRig) -> list[str]:
    ids = []
    async for wf in rig.client.list_workflows(f"TaskQueue = '{rig.settings.task_queue}'"):
        ids.append(wf.id)
    return ids


async def _start_input(rig: SlackRig, task_id: str) -> TaskRequest:
    async for event in rig.client.get_workflow_handle(task_id).fetch_history_events():
        payload = event.workflow_execution_started_event_attributes.input.payloads[0]
        return TaskRequest.model_validate_json(payload.data)
    raise AssertionError("no history")


async def _accepted(rig: SlackRig, trigger_id: str) -> str:
    task_id = service.task_id_for("slack", trigger_id)
    await rig.api.await_for(
        lambda: [c for c in rig.api.calls_of("chat.postMessage") if task_id in c.args.get("text", "") and c.args.get("thread_ts")],
        what="the accepted reply",
    )
    return task_id


async def _review_message(rig: SlackRig, task_id: str) -> dict:
    def find():
        for msgs in rig.api.messages.values():
            for m in msgs:
                meta = m.get("metadata") or {}
                if meta.get("event_type") == "conveyor_review" and meta["event_payload"]["task_id"] == task_id:
                    return m
        return None

    return await rig.api.await_for(find, what="the review message")


def _buttons(message: dict) -> dict[str, dict]:
    return {el["action_id"]: el for b in message.get("blocks", []) if b["type"] == "actions" for el in b["elements"]}


async def _stage(rig: SlackRig, task_id: str, stage: Stage, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = await service.task_status(rig.client, task_id)
        if status.stage == stage:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{task_id} is {status.stage}, expected {stage}")
        await __import__("asyncio").sleep(0.05)


async def test_slash_command_acks_fast_and_starts_exactly_once(rig: SlackRig) -> None:
    body, form = rig.sender.slash_body("echo hi >> README.md", user="U100", channel="C100")
    first = await rig.post(body, "application/x-www-form-urlencoded")
    assert first.status == 200
    assert first.elapsed_s < ACK_BUDGET_S
    task_id = await _accepted(rig, form["trigger_id"])
    # The same delivery again (a retry, or a proxy's double submission): same trigger_id.
    again = await rig.post(body, "application/x-www-form-urlencoded", headers={"X-Slack-Retry-Num": "1"})
    assert again.status == 200
    await __import__("asyncio").sleep(0.5)
    assert await _workflow_ids(rig) == [task_id]
    assert len(_roots(rig)) == 1
    request = await _start_input(rig, task_id)
    assert request.text == "echo hi >> README.md"  # Slack's &gt; entities decoded
    assert request.repo.name == "web"  # the channel's default repo
    assert request.requester.principal == "slack:U100"
    assert request.origin.slack_channel == "C100"
    assert request.origin.slack_thread_ts == _roots(rig)[0] and False or request.origin.slack_thread_ts
    root_ts = [m for m in rig.api.messages["C100"] if not m.get("thread_ts")][0]["ts"]
    assert request.origin.slack_thread_ts == root_ts
    reply = [c.args["text"] for c in rig.api.calls_of("chat.postMessage") if c.args.get("thread_ts") == root_ts and task_id in c.args.get("text", "")][0]
    assert rig.settings.task_ui_url(task_id) in reply


async def test_same_text_twice_is_one_task(rig: SlackRig) -> None:
    first = await rig.slash("repo:api touch x", user="U300", channel="C100")
    assert first.status == 200
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("chat.postMessage") if "accepted as task" in c.args.get("text", "")])
    second = await rig.slash("repo:api touch x", user="U300", channel="C100")
    assert second.status == 200
    reply = await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "same thing" in c.args.get("text", "")])
    assert reply[0].args["response_type"] == "ephemeral"
    assert len(await _workflow_ids(rig)) == 1


@pytest.mark.parametrize(
    "text,user,expect",
    [
        ("repo:nope do things", "U100", "Unknown repository `nope`"),
        ("do things", "U999", "may not start tasks on web"),
        ("", "U100", "The task is empty"),
        ("repo:web   ", "U100", "The task is empty"),
        ("x" * 20_001, "U100", "the limit is 20,000"),
    ],
)
async def test_bad_commands_get_an_ephemeral_error_and_start_nothing(rig: SlackRig, text: str, user: str, expect: str) -> None:
    resp = await rig.slash(text, user=user, channel="C100")
    assert resp.status == 200
    body = resp.json()
    assert expect in body["text"], body
    assert body.get("response_type", "ephemeral") == "ephemeral"
    await __import__("asyncio").sleep(0.3)
    assert await _workflow_ids(rig) == []
    assert rig.api.calls_of("chat.postMessage") == []


async def test_forged_and_stale_signatures_get_401(rig: SlackRig) -> None:
    body, _ = rig.sender.slash_body("echo hi", user="U100")
    forged = await rig.post(body, "application/x-www-form-urlencoded", signature="v0=" + "0" * 64)
    assert forged.status == 401
    other_secret = await rig.post(body, "application/x-www-form-urlencoded", signature=sign("not-the-secret", int(time.time()), body))
    assert other_secret.status == 401
    stale_ts = int(time.time()) - 301
    stale = await rig.post(body, "application/x-www-form-urlencoded", timestamp=stale_ts, signature=sign(SIGNING_SECRET, stale_ts, body))
    assert stale.status == 401
    fresh = await rig.post(body, "application/x-www-form-urlencoded")  # the same body, signed now: accepted
    assert fresh.status == 200
    await _accepted(rig, urllib.parse.parse_qs(body)["trigger_id"][0])
    assert len(await _workflow_ids(rig)) == 1


async def test_temporal_unreachable_starts_nothing_and_says_retry(rig: SlackRig, monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.config import Settings

    dead = lazy_client_provider(Settings(temporal_address="127.0.0.1:1", task_queue=rig.settings.task_queue))
    monkeypatch.setattr(rig.app._conveyor, "client_provider", dead)
    resp = await rig.slash("echo hi", user="U100", channel="C100")
    assert resp.status == 200 and resp.elapsed_s < ACK_BUDGET_S
    said = await rig.api.await_for(lambda: rig.api.calls_of("response_url"), what="the retry message")
    assert "retry" in said[0].args["text"] and said[0].args["response_type"] == "ephemeral"
    assert rig.api.calls_of("chat.postMessage") == []  # no thread root left behind
    assert await _workflow_ids(rig) == []
