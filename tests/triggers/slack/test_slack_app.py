"""The bolt app over real HTTP with real signatures, against the Slack Web API emulator and a real
Temporal dev server running the real AgentTaskWorkflow (stand-in code host and agent)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse

import pytest

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
        await asyncio.sleep(0.05)


async def test_slash_command_acks_fast_and_starts_exactly_once(rig: SlackRig) -> None:
    body, form = rig.sender.slash_body("echo hi >> README.md", user="U100", channel="C100")
    first = await rig.post(body, "application/x-www-form-urlencoded")
    assert first.status == 200
    assert first.elapsed_s < ACK_BUDGET_S
    task_id = await _accepted(rig, form["trigger_id"])
    # The same delivery again (a retry, or a proxy's double submission): same trigger_id.
    again = await rig.post(body, "application/x-www-form-urlencoded", headers={"X-Slack-Retry-Num": "1"})
    assert again.status == 200
    await asyncio.sleep(0.5)
    assert await _workflow_ids(rig) == [task_id]
    assert len(_roots(rig)) == 1
    request = await _start_input(rig, task_id)
    assert request.text == "echo hi >> README.md"  # Slack's &gt; entities decoded
    assert request.repo.name == "web"  # the channel's default repo
    assert request.requester.principal == "slack:U100"
    assert request.origin.slack_channel == "C100"
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
    await asyncio.sleep(0.3)
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
    # a button click while Temporal is down: told to retry, the message keeps its buttons
    value = json.dumps({"task_id": "cv-0123456789ab", "head_sha": "b" * 40})
    click = await rig.click("conveyor_approve", value, user="U200", message_ts="1.000001")
    assert click.status == 200 and click.elapsed_s < ACK_BUDGET_S
    said = await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "approval was not sent" in c.args.get("text", "")])
    assert said[0].args["response_type"] == "ephemeral"
    assert rig.api.calls_of("chat.update") == []


async def _to_review(rig: SlackRig, text: str = "echo hi >> README.md", user: str = "U100") -> tuple[str, dict]:
    body, form = rig.sender.slash_body(text, user=user, channel="C100")
    assert (await rig.post(body, "application/x-www-form-urlencoded")).status == 200
    task_id = await _accepted(rig, form["trigger_id"])
    return task_id, await _review_message(rig, task_id)


def _progress(rig: SlackRig, task_id: str) -> dict | None:
    for m in rig.api.messages.get("C100", []):
        meta = m.get("metadata") or {}
        if meta.get("event_type") == "conveyor_progress" and meta["event_payload"]["task_id"] == task_id:
            return m
    return None


async def test_review_approve_merge_and_revert_through_slack(rig: SlackRig) -> None:
    task_id, review = await _to_review(rig)
    buttons = _buttons(review)
    assert set(buttons) == {"conveyor_approve", "conveyor_reject"}
    value = json.loads(buttons["conveyor_approve"]["value"])
    assert value == {"task_id": task_id, "head_sha": "b" * 40}
    text = json.dumps(review["blocks"])
    assert "Appended a line to README.md" in text  # summary
    assert "http://codehost.test/changes/7" in text and rig.settings.task_ui_url(task_id) in text  # links
    assert "+1" in text  # files changed / diff stats
    root_ts = review["thread_ts"]
    progress = _progress(rig, task_id)
    assert progress is not None and progress["thread_ts"] == root_ts and "Awaiting review" in progress["blocks"][0]["text"]["text"]

    # the requester may approve on this repo in general, but not their own task (approver_must_differ)
    own = await rig.click("conveyor_approve", buttons["conveyor_approve"]["value"], user="U100", user_name="alice", message_ts=review["ts"], message=review)
    assert own.status == 200 and own.elapsed_s < ACK_BUDGET_S
    refused = await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "other than the requester" in c.args.get("text", "")])
    assert refused[0].args["response_type"] == "ephemeral" and refused[0].args["replace_original"] is False
    # not an approver at all
    await rig.click("conveyor_approve", buttons["conveyor_approve"]["value"], user="U300", user_name="carol", message_ts=review["ts"], message=review)
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "not allowed to approve" in c.args.get("text", "")])
    status = await service.task_status(rig.client, task_id)
    assert status.stage == Stage.awaiting_review and not [e for e in status.audit if e.action == "approved"]
    assert _buttons(rig.api.message("C100", review["ts"]))  # still has its buttons

    # a button value naming no head (not one we post): refused, whoever clicks
    await rig.click("conveyor_approve", json.dumps({"task_id": task_id}), user="U200", user_name="bob", message_ts=review["ts"], message=review)
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "names no reviewed head" in c.args.get("text", "")])
    assert (await service.task_status(rig.client, task_id)).stage == Stage.awaiting_review

    # a real approver
    ok = await rig.click("conveyor_approve", buttons["conveyor_approve"]["value"], user="U200", user_name="bob", message_ts=review["ts"], message=review)
    assert ok.status == 200 and ok.elapsed_s < ACK_BUDGET_S
    await _stage(rig, task_id, Stage.merged)
    status = await service.task_status(rig.client, task_id)
    approved = [e for e in status.audit if e.action == "approved"]
    assert approved and approved[0].by == "bob" and approved[0].via == "slack:C100"
    merge = [inp for name, inp in rig.standins.calls if name == "merge_change"][0]
    assert merge.approved_head == "b" * 40 and merge.approved_by.principal == "slack:U200"
    decided = await rig.api.await_for(lambda: (m := rig.api.message("C100", review["ts"])) and not _buttons(m) and m)
    assert "Approved by <@U200>" in json.dumps(decided["blocks"])
    merged = await rig.api.await_for(lambda: (p := _progress(rig, task_id)) and "Merged" in json.dumps(p["blocks"]) and p)
    assert "conveyor_revert" in _buttons(merged)
    assert len([m for m in rig.api.messages["C100"] if (m.get("metadata") or {}).get("event_type") == "conveyor_progress"]) == 1

    # on call: a non-reverter is refused, a reverter's /agent revert reverts
    await rig.slash(f"revert {task_id} broke prod", user="U100", channel="C100")
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "not allowed to revert" in c.args.get("text", "")])
    assert not [1 for name, _ in rig.standins.calls if name == "revert_change"]
    await rig.slash(f"revert {task_id} broke prod", user="U200", channel="C100")
    await _stage(rig, task_id, Stage.reverted)
    revert = [inp for name, inp in rig.standins.calls if name == "revert_change"][0]
    assert revert.decision.by.principal == "slack:U200" and revert.decision.reason == "broke prod"
    link = "http://codehost.test/commit/" + "d" * 40
    await rig.api.await_for(lambda: [m for m in rig.api.thread("C100", root_ts) if link in m.get("text", "")], what="the revert link in the thread")
    final = await rig.api.await_for(lambda: (p := _progress(rig, task_id)) and "Reverted" in json.dumps(p["blocks"]) and p)
    assert "conveyor_revert" not in _buttons(final)


async def test_reject_opens_a_modal_and_requires_a_reason(rig: SlackRig) -> None:
    task_id, review = await _to_review(rig)
    value = _buttons(review)["conveyor_reject"]["value"]
    await rig.click("conveyor_reject", value, user="U300", user_name="carol", message_ts=review["ts"], message=review)
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "not allowed" in c.args.get("text", "")])
    assert rig.api.views == []

    rig.api.fail_next("views.open", "expired_trigger_id")
    await rig.click("conveyor_reject", value, user="U200", user_name="bob", message_ts=review["ts"], message=review)
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "click Reject again" in c.args.get("text", "")])
    click = await rig.click("conveyor_reject", value, user="U200", user_name="bob", message_ts=review["ts"], message=review)
    assert click.status == 200
    view = await rig.api.await_for(lambda: rig.api.views and rig.api.views[-1], what="views.open")
    assert view["callback_id"] == "conveyor_reject_view"
    empty = await rig.submit_view(view, {"reason": {"reason": {"type": "plain_text_input", "value": "   "}}}, user="U200")
    assert empty.status == 200
    assert empty.json() == {"response_action": "errors", "errors": {"reason": "Please say why: the requester sees this reason."}}
    await asyncio.sleep(0.3)
    assert (await service.task_status(rig.client, task_id)).stage == Stage.awaiting_review

    done = await rig.submit_view(view, {"reason": {"reason": {"type": "plain_text_input", "value": "wrong file"}}}, user="U200")
    assert done.status == 200 and not done.body  # an empty ack closes the modal
    await _stage(rig, task_id, Stage.rejected)
    closed = [inp for name, inp in rig.standins.calls if name == "close_change"]
    assert closed and "wrong file" in closed[0].reason
    decided = await rig.api.await_for(lambda: (m := rig.api.message("C100", review["ts"])) and not _buttons(m) and m)
    assert "Rejected by <@U200>: wrong file" in json.dumps(decided["blocks"])
    assert "Appended a line to README.md" in json.dumps(decided["blocks"])  # what was reviewed stays readable
    await rig.api.await_for(lambda: (p := _progress(rig, task_id)) and "Rejected" in json.dumps(p["blocks"]))


async def test_mention_in_thread_carries_the_conversation_and_dedupes_retries(rig: SlackRig) -> None:
    root = rig.api.seed_message("C200", "the login page returns 500 since this morning", "U300")
    rig.api.seed_message("C200", "stack trace says KeyError: 'session'", "U100", thread_ts=root)
    ts = rig.api.seed_message("C200", "<@UBOT> please fix it", "U100", thread_ts=root)
    event = {"type": "app_mention", "user": "U100", "text": "<@UBOT> fix the KeyError &amp; add a test", "ts": ts,
             "thread_ts": root, "channel": "C200", "event_ts": ts}
    first = await asyncio.to_thread(rig.sender.event, event, "Ev0001")
    assert first.status == 200 and first.elapsed_s < ACK_BUDGET_S
    retry = await asyncio.to_thread(rig.sender.event, event, "Ev0001", 1)
    assert retry.status == 200
    task_id = service.task_id_for("slack", f"C200:{ts}")
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("chat.postMessage") if task_id in c.args.get("text", "")])
    await asyncio.sleep(0.3)
    assert await _workflow_ids(rig) == [task_id]
    request = await _start_input(rig, task_id)
    assert request.text == "fix the KeyError & add a test"
    assert request.repo.name == "api"
    assert request.origin.slack_thread_ts == root
    assert request.origin.conversation == [
        "<@U300>: the login page returns 500 since this morning",
        "<@U100>: stack trace says KeyError: 'session'",
    ]
    assert request.requester.display == "alice"
    replies = [c for c in rig.api.calls_of("chat.postMessage") if f"accepted as task `{task_id}`" in c.args.get("text", "")]
    assert len(replies) == 1 and replies[0].args["thread_ts"] == root


async def test_mention_by_a_stranger_is_refused_ephemerally(rig: SlackRig) -> None:
    resp = await rig.mention("do things", channel="C100", user="U999")
    assert resp.status == 200
    eph = await rig.api.await_for(lambda: rig.api.calls_of("chat.postEphemeral"))
    assert eph[0].args["user"] == "U999" and "may not start tasks" in eph[0].args["text"]
    await asyncio.sleep(0.2)
    assert await _workflow_ids(rig) == []


async def test_status_and_list(rig: SlackRig) -> None:
    task_id, _ = await _to_review(rig)
    await rig.slash(f"status {task_id}", user="U200")
    said = await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if task_id in c.args.get("text", "")])
    assert "awaiting review" in said[0].args["text"] and said[0].args["response_type"] == "ephemeral"
    # someone with no role on `web` (any workspace member, or an external one in a shared channel)
    await rig.slash(f"status {task_id}", user="U999")
    said = await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "not visible to you" in c.args.get("text", "")])
    assert "awaiting review" not in said[0].args["text"]
    await rig.mention(f"status {task_id}", channel="C100", user="U999")
    eph = await rig.api.await_for(lambda: [c for c in rig.api.calls_of("chat.postEphemeral") if c.args.get("user") == "U999"])
    assert "not visible to you" in eph[0].args["text"] and "awaiting review" not in eph[0].args["text"]
    await rig.slash("status cv-000000000000", user="U200")
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "no task cv-000000000000" in c.args.get("text", "")])
    deadline = time.monotonic() + 10
    while True:  # visibility (list) catches up asynchronously
        before = len(rig.api.calls_of("response_url"))
        await rig.slash("list", user="U100")
        said = await rig.api.await_for(lambda: len(rig.api.calls_of("response_url")) > before)
        text = rig.api.calls_of("response_url")[-1].args["text"]
        if task_id in text or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert task_id in text and "awaiting review" in text
    await rig.slash("list", user="U200")
    await rig.api.await_for(lambda: "no Conveyor tasks" in rig.api.calls_of("response_url")[-1].args.get("text", ""))


async def test_stale_head_is_refused_and_the_revert_button_reverts(rig: SlackRig) -> None:
    task_id, review = await _to_review(rig)
    stale = json.dumps({"task_id": task_id, "head_sha": "f" * 40})
    await rig.click("conveyor_approve", stale, user="U200", message_ts=review["ts"], message=review)
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "change moved" in c.args.get("text", "")])
    assert (await service.task_status(rig.client, task_id)).stage == Stage.awaiting_review

    await rig.click("conveyor_approve", _buttons(review)["conveyor_approve"]["value"], user="U200", message_ts=review["ts"], message=review)
    merged = await rig.api.await_for(lambda: (p := _progress(rig, task_id)) and "conveyor_revert" in _buttons(p) and p)
    revert_value = _buttons(merged)["conveyor_revert"]["value"]
    await rig.click("conveyor_revert", revert_value, user="U100", message_ts=merged["ts"], message=merged)
    await rig.api.await_for(lambda: [c for c in rig.api.calls_of("response_url") if "not allowed to revert" in c.args.get("text", "")])
    await rig.click("conveyor_revert", revert_value, user="U200", message_ts=merged["ts"], message=merged)
    await _stage(rig, task_id, Stage.reverted)
    # a second click (double submission) is harmless: one revert
    await rig.click("conveyor_revert", revert_value, user="U200", message_ts=merged["ts"], message=merged)
    await asyncio.sleep(0.5)
    assert len([1 for name, _ in rig.standins.calls if name == "revert_change"]) == 1


async def test_events_url_verification_handshake(rig: SlackRig) -> None:
    body = json.dumps({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"})
    resp = await rig.post(body, "application/json")
    assert resp.status == 200 and resp.json() == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    forged = await rig.post(body, "application/json", signature="v0=" + "1" * 64)
    assert forged.status == 401


async def test_accepted_reply_tells_the_queue_position(slack_temporal, slack_api, tmp_path) -> None:
    import uuid

    from conveyor.config import Settings
    from tests.triggers.slack.conftest import repo_config, serve_rig

    # no worker on this queue: every task waits in `received`
    settings = Settings(task_queue=f"queue-{uuid.uuid4().hex[:8]}", home=tmp_path)
    async with serve_rig(slack_temporal.client, settings, repo_config(), slack_api) as rig:
        texts = []
        for i in range(3):
            body, form = rig.sender.slash_body(f"echo {i}", user="U100", channel="C100")
            assert (await rig.post(body, "application/x-www-form-urlencoded")).status == 200
            task_id = await _accepted(rig, form["trigger_id"])
            texts.append([c.args["text"] for c in rig.api.calls_of("chat.postMessage") if f"`{task_id}`" in c.args.get("text", "")][0])
        assert "ahead in the queue" not in texts[0]
        assert "1 task ahead in the queue" in texts[1]
        assert "2 tasks ahead in the queue" in texts[2]
