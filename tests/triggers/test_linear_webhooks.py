"""The Linear webhook receiver over real HTTP, signed like Linear, against the Linear emulator
and a real Temporal dev server (a stand-in AgentTaskWorkflow records what it was started with)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from adapters.linear import LinearClient
from conveyor.config import ConveyorConfig, RepoPolicy, Settings
from conveyor.models import TaskRequest
from triggers import service
from triggers.linear_webhooks import LinearWebhookReceiver, event_key, serve
from tests.emulators.linear_api import LinearEmulator



@workflow.defn(name="AgentTaskWorkflow")
class StandInTaskWorkflow:
    @workflow.run
    async def run(self, request: TaskRequest) -> dict:
        return {"text": request.text, "requester": request.requester.principal, "issue": request.origin.linear_issue_id,
                "conversation": request.origin.conversation, "repo": request.repo.name}


@pytest.fixture()
async def stack(temporal_env, tmp_path, monkeypatch):  # temporal_env: tests/conftest.py
    emu = LinearEmulator().start()
    monkeypatch.setenv("LINEAR_API_KEY", emu.api_key)
    monkeypatch.setenv("LINEAR_API_URL", emu.url)
    monkeypatch.setenv("LINEAR_WEBHOOK_SECRET", emu.webhook_secret)
    team = emu.add_team("ENG")
    label = emu.add_label("agent")
    bug = emu.add_label("Bug")
    ada = emu.add_user("Ada Lovelace", "ada@example.com")
    eve = emu.add_user("Eve Outsider", "eve@example.com")
    config = ConveyorConfig(repos={
        "demo": RepoPolicy(name="demo", url=str(tmp_path / "demo.git"), linear_team="ENG",
                           invokers=["slack:UADA", f"linear:{emu.viewer_id}"], linear_users={ada["email"]: "slack:UADA"}),
    })
    settings = Settings(home=tmp_path / "home", task_queue=f"q-{uuid.uuid4().hex[:8]}")
    client: Client = temporal_env.client
    started: list[TaskRequest] = []

    async def starter(request: TaskRequest):
        started.append(request)
        return await service.start_task(client, request, settings)

    receiver = LinearWebhookReceiver(settings, config, starter=starter)
    runner = await serve(receiver, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    # Unsandboxed: this test module imports HTTP clients the workflow sandbox would refuse.
    worker = Worker(client, task_queue=settings.task_queue, workflows=[StandInTaskWorkflow], workflow_runner=UnsandboxedWorkflowRunner())
    async with worker:
        yield dict(emu=emu, team=team, label=label, bug=bug, ada=ada, eve=eve, client=client, started=started,
                   url=f"http://127.0.0.1:{port}/linear/webhook", receiver=receiver)
    await runner.cleanup()
    emu.stop()


async def deliver(s, payload, **kw):
    return await asyncio.to_thread(s["emu"].deliver, s["url"], payload, **kw)


async def test_labeled_issue_starts_one_task_with_the_conversation(stack):
    s = stack
    emu = s["emu"]
    issue = emu.add_issue(s["team"], "Fix flaky retry test", "It fails 1 in 20 runs.", labels=[s["label"]], creator=s["ada"])
    emu.add_comment(issue, "Seen on main as well", s["ada"])
    payload = emu.issue_webhook("create", issue, s["ada"])
    status, body = await deliver(s, payload, delivery_id="d-1")
    assert status == 200 and body["started"] is True, body
    assert body["task_id"] == service.task_id_for("linear", event_key(payload))
    result = await s["client"].get_workflow_handle(body["task_id"]).result()
    assert result["text"] == "ENG-1: Fix flaky retry test\n\nIt fails 1 in 20 runs."
    assert result["requester"] == "slack:UADA", "the Linear user is mapped to the policy identity"
    assert result["issue"] == issue["id"] and result["repo"] == "demo"
    assert result["conversation"] == ["ENG-1 Fix flaky retry test\n\nIt fails 1 in 20 runs.", "ada: Seen on main as well"]
    # Redelivery (same Linear-Delivery): no second task, in-process or at Temporal.
    status, again = await deliver(s, payload, delivery_id="d-1")
    assert status == 200 and again["duplicate"] is True and again["task_id"] == body["task_id"]
    s["receiver"]._seen.clear()  # as after a receiver restart
    status, again = await deliver(s, payload, delivery_id="d-1")
    assert status == 200 and again["started"] is False
    assert len(s["started"]) == 2  # the second reached Temporal, which refused the duplicate


async def test_replayed_body_under_fresh_delivery_ids_starts_nothing_new(stack):
    """Linear-Delivery is not signed: a captured delivery replayed inside the timestamp window with
    new delivery ids must land on the same task, in-process and at Temporal."""
    s = stack
    emu = s["emu"]
    issue = emu.add_issue(s["team"], "Rotate keys", labels=[s["label"]], creator=s["ada"])
    payload = emu.issue_webhook("create", issue, s["ada"])
    status, first = await deliver(s, payload, delivery_id="genuine")
    assert status == 200 and first["started"] is True, first
    status, replay = await deliver(s, payload, delivery_id="replay-1")
    assert status == 200 and replay["task_id"] == first["task_id"] and replay.get("duplicate") is True
    s["receiver"]._seen.clear()
    status, replay = await deliver(s, payload, delivery_id="replay-2")
    assert status == 200 and replay["task_id"] == first["task_id"] and replay["started"] is False
    # Linear's own retry of the event is re-signed with a fresh timestamp: still the same task.
    retry = {**payload, "webhookTimestamp": payload["webhookTimestamp"] + 1500}
    status, again = await deliver(s, retry, delivery_id="genuine")
    assert again["task_id"] == first["task_id"] and again["started"] is False


async def test_event_without_an_actor_is_not_attributed_to_the_creator(stack):
    s = stack
    emu = s["emu"]
    issue = emu.add_issue(s["team"], "Drop the users table", labels=[s["label"]], creator=s["ada"])
    status, body = await deliver(s, emu.issue_webhook("create", issue, None))
    assert status == 200 and "names no Linear user" in body.get("ignored", ""), body
    assert s["started"] == []


async def test_label_added_by_update_starts_but_other_updates_do_not(stack):
    s = stack
    emu = s["emu"]
    issue = emu.add_issue(s["team"], "Bump deps", labels=[s["bug"]])
    issue["labelIds"].append(s["label"]["id"])
    payload = emu.issue_webhook("update", issue, s["ada"], updated_from={"labelIds": [s["bug"]["id"]]})
    status, body = await deliver(s, payload)
    assert status == 200 and body.get("started") is True, body
    # A title edit on the (already labeled) issue: no task.
    payload = emu.issue_webhook("update", issue, s["ada"], updated_from={"title": "old title"})
    status, body = await deliver(s, payload)
    assert status == 200 and "ignored" in body
    # An issue without the label: no task.
    plain = emu.add_issue(s["team"], "Unlabeled", labels=[s["bug"]])
    status, body = await deliver(s, emu.issue_webhook("create", plain, s["ada"]))
    assert "ignored" in body
    # Other event types: no task.
    status, body = await deliver(s, {**emu.issue_webhook("create", issue, s["ada"]), "type": "Comment"})
    assert "ignored" in body
    assert len(s["started"]) == 1


async def test_signature_and_timestamp_are_enforced(stack):
    s = stack
    emu = s["emu"]
    issue = emu.add_issue(s["team"], "x", labels=[s["label"]])
    payload = emu.issue_webhook("create", issue, s["ada"])
    status, body = await deliver(s, payload, signature="0" * 64)
    assert status == 401 and body["error"] == "bad signature"
    raw = json.dumps(payload).encode()
    status, _ = await deliver(s, payload, raw=raw, signature=emu.sign(raw, "another-secret"))
    assert status == 401
    tampered = json.dumps({**payload, "data": {**payload["data"], "title": "rm -rf"}}).encode()
    status, _ = await deliver(s, payload, raw=tampered, signature=emu.sign(raw))
    assert status == 401
    stale = emu.issue_webhook("create", issue, s["ada"], timestamp_ms=int((time.time() - 61) * 1000))
    status, body = await deliver(s, stale)
    assert status == 401 and "60 s window" in body["error"]
    future = emu.issue_webhook("create", issue, s["ada"], timestamp_ms=int((time.time() + 120) * 1000))
    status, _ = await deliver(s, future)
    assert status == 401
    status, body = await deliver(s, payload, raw=b"[1, 2]", signature=emu.sign(b"[1, 2]"))
    assert status == 400
    # signed, fresh, but oddly shaped: a clear 400, never a 500
    for odd in ({**payload, "data": "x"}, {**payload, "data": {**payload["data"], "labels": ["agent"]}},
                {**payload, "data": {**payload["data"], "team": "ENG"}}, {**payload, "actor": "eve"}):
        status, body = await deliver(s, {**odd, "webhookTimestamp": int(time.time() * 1000)})
        assert status == 400 and "malformed" in body["error"], (status, body)
    assert s["started"] == []


async def test_unmapped_user_without_rights_is_refused_on_the_issue(stack):
    s = stack
    emu = s["emu"]
    issue = emu.add_issue(s["team"], "Please do it", labels=[s["label"]], creator=s["eve"])
    status, body = await deliver(s, emu.issue_webhook("create", issue, s["eve"]))
    assert status == 200 and "may not start tasks" in body["refused"]
    assert s["started"] == []
    comments = emu.comments_on(issue)
    assert len(comments) == 1 and comments[0]["body"].startswith("Conveyor did not start a task: Eve Outsider may not start tasks on demo")


async def test_team_without_repository(stack):
    s = stack
    emu = s["emu"]
    other = emu.add_team("OPS")
    issue = emu.add_issue(other, "x", labels=[s["label"]])
    status, body = await deliver(s, emu.issue_webhook("create", issue, s["ada"]))
    assert status == 200 and body["ignored"] == "no repository for Linear team OPS"
    assert "no repository is configured for Linear team `OPS`" in emu.comments_on(issue)[0]["body"]


async def test_missing_secret_fails_closed(tmp_path, monkeypatch):
    monkeypatch.delenv("LINEAR_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("LINEAR_API_KEY", raising=False)
    receiver = LinearWebhookReceiver(Settings(home=tmp_path), ConveyorConfig(), starter=None)
    runner = await serve(receiver, "127.0.0.1", 0)
    try:
        emu = LinearEmulator()
        status, body = await asyncio.to_thread(
            emu.deliver, f"http://127.0.0.1:{runner.addresses[0][1]}/linear/webhook", {"type": "Issue"}
        )
        assert status == 503 and "LINEAR_WEBHOOK_SECRET" in body["error"]
    finally:
        await runner.cleanup()


def test_cli_registers_the_command():
    import argparse

    from triggers import linear_webhooks

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    linear_webhooks.register(sub)
    args = parser.parse_args(["linear-webhooks", "--port", "9999"])
    assert args.port == 9999 and args.func is linear_webhooks._cmd
    assert isinstance(LinearClient, type)
