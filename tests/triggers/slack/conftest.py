"""Fixtures for the Slack trigger: a real Temporal dev server, the real AgentTaskWorkflow on a
fresh task queue with stand-in activities (registered under the real activity names, except
`notify`, which is the real SlackNotifier), the real bolt app over real HTTP, and the Slack Web
API emulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio import activity
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from adapters.notifier.slack import SlackNotifier
from conveyor.config import ConveyorConfig, RepoPolicy, Settings
from conveyor.models import (
    AgentOutcome,
    AgentRunInput,
    AgentRunResult,
    ArtifactRef,
    ChangeRequest,
    ChecksInput,
    ChecksResult,
    CloseInput,
    ContextInput,
    ContextResult,
    MergeInput,
    MergeResult,
    Notice,
    PublishInput,
    RevertInput,
    RevertResult,
)
from tests.emulators.slack_api import SlackSender, SlackWebAPI
from triggers.slack_app import bound_port, build_app, serve_http
from workflows.task import AgentTaskWorkflow, RevertTaskWorkflow

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-emulated-token"


@pytest.fixture
def slack_temporal(temporal_env: WorkflowEnvironment) -> WorkflowEnvironment:
    """The session's one dev server (tests/conftest.py); each test uses a fresh task queue."""
    return temporal_env


def repo_config() -> ConveyorConfig:
    web = RepoPolicy(
        name="web",
        url="/nonexistent/web.git",
        invokers=["U100", "slack:U300"],
        approvers=["U200", "slack:U100"],
        reverters=["U200"],
        approver_must_differ=True,
        slack_channels=["C100"],
    )
    api = RepoPolicy(name="api", url="/nonexistent/api.git", invokers=["*"], approvers=["*"], reverters=["*"], slack_channels=["C200"])
    return ConveyorConfig(repos={"web": web, "api": api})


@dataclass
class StandIns:
    """Stand-in code host and agent: deterministic results, and a record of what was called."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    agent_gate: asyncio.Event | None = None

    def activities(self, notifier: SlackNotifier) -> list[Any]:
        calls = self.calls
        gate = self

        @activity.defn(name="build_context")
        async def build_context(inp: ContextInput) -> ContextResult:
            calls.append(("build_context", inp))
            return ContextResult(base_sha="a" * 40, document=ArtifactRef(uri="mem://ctx", size=0, sha256="0" * 64))

        @activity.defn(name="run_agent")
        async def run_agent(inp: AgentRunInput) -> AgentRunResult:
            calls.append(("run_agent", inp))
            if gate.agent_gate is not None:
                while not gate.agent_gate.is_set():
                    activity.heartbeat()
                    await asyncio.sleep(0.05)
            return AgentRunResult(
                outcome=AgentOutcome.ok,
                patch=ArtifactRef(uri="mem://patch", size=10, sha256="1" * 64),
                summary="Appended a line to README.md",
                files_changed=1,
                lines_added=1,
                duration_s=2.0,
            )

        @activity.defn(name="publish_change")
        async def publish_change(inp: PublishInput) -> ChangeRequest:
            calls.append(("publish_change", inp))
            return ChangeRequest(number=7, branch=f"conveyor/{inp.task_id}", head_sha="b" * 40, base=inp.base,
                                 url="http://codehost.test/changes/7", files_changed=1, lines_added=1)

        @activity.defn(name="check_change")
        async def check_change(inp: ChecksInput) -> ChecksResult:
            return ChecksResult(state="green")

        @activity.defn(name="merge_change")
        async def merge_change(inp: MergeInput) -> MergeResult:
            calls.append(("merge_change", inp))
            return MergeResult(outcome="merged", merge_sha="c" * 40)

        @activity.defn(name="close_change")
        async def close_change(inp: CloseInput) -> None:
            calls.append(("close_change", inp))

        @activity.defn(name="revert_change")
        async def revert_change(inp: RevertInput) -> RevertResult:
            calls.append(("revert_change", inp))
            return RevertResult(revert_sha="d" * 40, url="http://codehost.test/commit/" + "d" * 40)

        @activity.defn(name="notify")
        async def notify(notice: Notice) -> dict[str, str]:
            calls.append(("notify", notice))
            return await asyncio.to_thread(notifier.notify, notice)

        return [build_context, run_agent, publish_change, check_change, merge_change, close_change, revert_change, notify]


@dataclass
class SlackRig:
    api: SlackWebAPI
    sender: SlackSender
    client: Client
    settings: Settings
    config: ConveyorConfig
    standins: StandIns
    url: str
    app: Any

    async def slash(self, text: str, **kw: Any):
        return await asyncio.to_thread(self.sender.slash, text, **kw)

    async def post(self, *args: Any, **kw: Any):
        return await asyncio.to_thread(self.sender.post, *args, **kw)

    async def mention(self, text: str, **kw: Any):
        return await asyncio.to_thread(self.sender.mention, text, **kw)

    async def click(self, *args: Any, **kw: Any):
        return await asyncio.to_thread(self.sender.click, *args, **kw)

    async def submit_view(self, *args: Any, **kw: Any):
        return await asyncio.to_thread(self.sender.submit_view, *args, **kw)


@asynccontextmanager
async def serve_rig(client: Client, settings: Settings, config: ConveyorConfig, api: SlackWebAPI,
                    standins: StandIns | None = None) -> AsyncIterator[SlackRig]:
    """The bolt app on an ephemeral port, pointed at the emulator, talking to `client`."""

    async def provider() -> Client:
        return client

    app = build_app(settings, config, provider)
    runner = await serve_http(app, 0, host="127.0.0.1")
    url = f"http://127.0.0.1:{bound_port(runner)}/slack/events"
    try:
        yield SlackRig(api, SlackSender(url, SIGNING_SECRET, api), client, settings, config, standins or StandIns(), url, app)
    finally:
        await runner.cleanup()


@pytest.fixture
def slack_api(monkeypatch: pytest.MonkeyPatch):
    api = SlackWebAPI(bot_token=BOT_TOKEN, users={"U100": "alice", "U200": "bob", "U300": "carol"}).start()
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.setenv("SLACK_API_URL", api.base_url)
    monkeypatch.delenv("SLACK_APP_TOKEN", raising=False)
    try:
        yield api
    finally:
        api.stop()


@pytest_asyncio.fixture
async def rig(slack_temporal: WorkflowEnvironment, slack_api: SlackWebAPI, tmp_path: Path) -> AsyncIterator[SlackRig]:
    """Real workflow, stand-in activities (real SlackNotifier), real bolt app over HTTP."""
    settings = Settings(task_queue=f"slack-{uuid.uuid4().hex[:8]}", home=tmp_path)
    client = slack_temporal.client
    standins = StandIns()
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[AgentTaskWorkflow, RevertTaskWorkflow],
        activities=standins.activities(SlackNotifier(settings)),
    )
    async with worker, serve_rig(client, settings, repo_config(), slack_api, standins) as r:
        yield r
