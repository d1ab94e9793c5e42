"""Socket Mode: with SLACK_APP_TOKEN set, `run_slack` dials out (apps.connections.open over the
Web API emulator, then a WebSocket) instead of serving HTTP; envelopes are acked at once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from conveyor.config import Settings
from tests.emulators.slack_api import SlackWebAPI, SocketModeServer
from tests.triggers.slack.conftest import repo_config
from triggers import service
from triggers.slack_app import run_slack


async def test_socket_mode_starts_a_task_without_a_public_url(temporal_env, slack_api: SlackWebAPI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLACK_APP_TOKEN", slack_api.app_token)
    monkeypatch.delenv("SLACK_SIGNING_SECRET")  # Socket Mode needs no signing secret
    socket = SocketModeServer(slack_api).start()
    settings = Settings(task_queue=f"sock-{uuid.uuid4().hex[:8]}", home=tmp_path)
    task = asyncio.create_task(run_slack(settings, repo_config(), temporal_env.client, port=1))
    try:
        await asyncio.to_thread(socket.connected.wait, 10)
        assert socket.connected.is_set()
        opened = slack_api.calls_of("apps.connections.open")
        assert opened and opened[0].token == slack_api.app_token
        trigger_id = slack_api.new_trigger_id()
        command = {"command": "/agent", "text": "echo hi &gt;&gt; README.md", "user_id": "U100", "user_name": "alice",
                   "channel_id": "C100", "team_id": "T0001", "trigger_id": trigger_id,
                   "response_url": slack_api.response_url("sock-1"), "api_app_id": "A0001"}
        envelope = socket.send("slash_commands", command)
        ack = await socket.ack_for(envelope, timeout=3)
        assert "payload" not in ack or not ack["payload"]  # an empty ack: the thread carries the answer
        task_id = service.task_id_for("slack", trigger_id)
        await slack_api.await_for(lambda: [c for c in slack_api.calls_of("chat.postMessage") if f"`{task_id}`" in c.args.get("text", "")])
        desc = await temporal_env.client.get_workflow_handle(task_id).describe()
        assert desc.id == task_id

        bad = socket.send("slash_commands", dict(command, text="repo:nope x", trigger_id=slack_api.new_trigger_id()))
        ack = await socket.ack_for(bad, timeout=3)
        assert "Unknown repository `nope`" in ack["payload"]["text"]
        assert ack["payload"]["response_type"] == "ephemeral"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        socket.stop()


async def test_run_slack_serves_http_when_there_is_no_app_token(temporal_env, slack_api: SlackWebAPI, tmp_path: Path) -> None:
    import json
    import socket as sockets

    from tests.emulators.slack_api import SlackSender
    from tests.triggers.slack.conftest import SIGNING_SECRET

    with sockets.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings(task_queue=f"http-{uuid.uuid4().hex[:8]}", home=tmp_path)
    task = asyncio.create_task(run_slack(settings, repo_config(), temporal_env.client, port=port, host="127.0.0.1"))
    try:
        sender = SlackSender(f"http://127.0.0.1:{port}/slack/events", SIGNING_SECRET, slack_api)
        body = json.dumps({"type": "url_verification", "challenge": "c-123"})
        for _ in range(50):  # until the server is up
            try:
                resp = await asyncio.to_thread(sender.post, body, "application/json")
                break
            except OSError:
                await asyncio.sleep(0.05)
        assert resp.status == 200 and resp.json() == {"challenge": "c-123"}
        assert slack_api.calls_of("apps.connections.open") == []  # HTTP mode does not dial out
        bad = await asyncio.to_thread(sender.post, body, "application/json", None, "v0=bad")
        assert bad.status == 401
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
