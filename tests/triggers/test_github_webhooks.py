"""The GitHub webhook receiver over real HTTP, signed like GitHub, against a real Temporal dev server.

A stand-in workflow registered under the name "AgentTaskWorkflow" records what it was started with
and the checks_changed signals it gets (the pipeline itself is tested elsewhere)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

from adapters.codehost.github import GitHubCodeHost
from conveyor.config import ConveyorConfig, GitHubSettings, RepoPolicy, Settings
from conveyor.models import Decision, TaskRequest
from tests.emulators.github_api import GitHubEmulator, github_emulator, make_bare_repo  # noqa: F401
from triggers import service
from triggers.github_webhooks import GitHubWebhooks, event_key, sign, task_for_branch

SECRET = "whsec-test"
REPO_URL = "https://github.example.com/acme/widgets"


@workflow.defn(name="AgentTaskWorkflow", sandboxed=False)
class StandIn:
    def __init__(self) -> None:
        self.request: TaskRequest | None = None
        self.signals: list[Decision] = []

    @workflow.run
    async def run(self, request: TaskRequest) -> None:
        self.request = request
        await workflow.wait_condition(lambda: bool(self.signals), timeout=timedelta(minutes=2))

    @workflow.signal(name="checks_changed")
    def checks_changed(self, decision: Decision) -> None:
        self.signals.append(decision)

    @workflow.query(name="probe")
    def probe(self) -> dict[str, Any]:
        return {"request": self.request.model_dump(mode="json") if self.request else None,
                "signals": [d.model_dump(mode="json") for d in self.signals]}


def policy(**kw: Any) -> RepoPolicy:
    return RepoPolicy(name="widgets", url=REPO_URL, host="github", invokers=["github:alice", "U100"], **kw)


class Hooks:
    def __init__(self, session: aiohttp.ClientSession, server: TestServer, client: Client):
        self.session, self.server, self.client = session, server, client

    async def post(self, event: str, payload: dict[str, Any], delivery: str | None = None,
                   signature: str | None = None) -> tuple[int, dict[str, Any]]:
        body = json.dumps(payload).encode()
        headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
                   "X-Hub-Signature-256": signature or sign(SECRET, body), "Content-Type": "application/json"}
        async with self.session.post(self.server.make_url("/github/webhooks"), data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def probe(self, task_id: str, until: Any = lambda p: p["request"], timeout: float = 15) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                data = await self.client.get_workflow_handle(task_id).query("probe")
                if until(data):
                    return data
            except Exception:
                if loop.time() > deadline:
                    raise
            if loop.time() > deadline:
                raise AssertionError(f"{task_id}: condition not reached: {data}")
            await asyncio.sleep(0.05)


async def hooks_for(client: Client, settings: Settings, config: ConveyorConfig, codehost: Any = None):
    app = GitHubWebhooks(settings, config, client, SECRET, codehost=codehost).app()
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def repository(url: str = REPO_URL) -> dict[str, Any]:
    return {"full_name": "acme/widgets", "html_url": url, "default_branch": "main"}


async def test_issue_label_signature_and_redelivery(client: Client, settings: Settings) -> None:
    config = ConveyorConfig(repos={"widgets": policy()})
    server = await hooks_for(client, settings, config)
    async with Worker(client, task_queue=settings.task_queue, workflows=[StandIn]), aiohttp.ClientSession() as session:
        hooks = Hooks(session, server, client)
        payload = {"action": "labeled", "label": {"name": "agent"}, "repository": repository(),
                   "sender": {"login": "alice", "type": "User"},
                   "issue": {"number": 5, "title": "Flaky retry test", "body": "It fails one run in ten.",
                             "html_url": f"{REPO_URL}/issues/5"}}
        # forged: signed with another secret -> 401, nothing started
        status, body = await hooks.post("issues", payload, delivery="d-forged", signature=sign("wrong", b"x"))
        assert status == 401
        status, _ = await hooks.post("issues", payload, delivery="d-unsigned", signature="sha1=abc")
        assert status == 401
        with pytest.raises(service.UnknownTask):
            await service.task_status(client, service.task_id_for("github", "d-forged"))

        status, body = await hooks.post("issues", payload, delivery="d-1")
        assert status == 200 and body["result"] == "started"
        task_id = body["task_id"]
        assert task_id == service.task_id_for("github", event_key(json.dumps(payload).encode()))
        data = await hooks.probe(task_id)
        req = data["request"]
        assert req["requester"] == {"kind": "github", "id": "alice", "display": "alice"}
        assert req["text"].startswith("Flaky retry test\n\nIt fails") and req["repo"]["name"] == "widgets"
        assert req["origin"]["url"].endswith("/issues/5") and req["origin"]["delivery_id"] == "d-1"

        # redelivered: remembered here; and even a fresh receiver (restart) does not start a second task
        status, again = await hooks.post("issues", payload, delivery="d-1")
        assert again["duplicate"] and again["task_id"] == task_id
        server2 = await hooks_for(client, settings, config)
        try:
            status, third = await Hooks(session, server2, client).post("issues", payload, delivery="d-1")
            assert third["result"] == "duplicate" and third["task_id"] == task_id
        finally:
            await server2.close()
        # X-GitHub-Delivery is not signed: the same signed body replayed under fresh ids starts nothing
        status, replay = await hooks.post("issues", payload, delivery="d-replayed")
        assert status == 200 and replay["task_id"] == task_id and replay.get("duplicate"), replay
        server3 = await hooks_for(client, settings, config)
        try:
            status, replay = await Hooks(session, server3, client).post("issues", payload, delivery="d-replayed-2")
            assert replay["result"] == "duplicate" and replay["task_id"] == task_id
        finally:
            await server3.close()

        # not an invoker -> refused; other labels and unknown repositories ignored
        status, body = await hooks.post("issues", {**payload, "sender": {"login": "mallory"}}, delivery="d-2")
        assert body["result"] == "refused" and "mallory" in body["detail"]
        # a GitHub login equal to a bare policy entry meant for another provider is not that person
        status, body = await hooks.post("issues", {**payload, "sender": {"login": "U100", "type": "User"}})
        assert body["result"] == "refused" and "U100" in body["detail"]
        status, body = await hooks.post("issues", {**payload, "label": {"name": "bug"}})
        assert body["result"] == "ignored"
        status, body = await hooks.post("issues", {**payload, "repository": repository("https://github.example.com/x/y")})
        assert body["result"] == "ignored" and "not in conveyor.toml" in body["detail"]
        # signed but oddly shaped payloads: a clear 400, never a 500
        for event, odd in (("issues", {**payload, "label": "agent"}), ("issues", {**payload, "issue": ["x"]}),
                           ("issue_comment", {**payload, "action": "created", "comment": "/agent x"}),
                           ("check_run", {**payload, "check_run": "x"}), ("issues", {**payload, "repository": "x"})):
            status, body = await hooks.post(event, odd)
            assert status == 400 and "malformed" in body["error"], (event, status, body)
        status, body = await hooks.post("ping", {"zen": "hi"})
        assert body["result"] == "pong"

        # a check run on the task's branch signals checks_changed
        branch = f"conveyor/{task_id}-flaky-retry-test"
        assert task_for_branch(branch) == task_id
        run = {"action": "completed", "repository": repository(),
               "check_run": {"name": "ci/test", "status": "completed", "conclusion": "success", "head_sha": "a" * 40,
                             "check_suite": {"head_branch": branch}, "pull_requests": []}}
        status, body = await hooks.post("check_run", run)
        assert body == {"result": "signalled", "task_ids": [task_id]}
        data = await hooks.probe(task_id, until=lambda p: p["signals"])
        [sig] = data["signals"]
        assert sig["by"] == {"kind": "ci", "id": "github", "display": "GitHub CI"} and sig["head_sha"] == "a" * 40
        status, body = await hooks.post("status", {"sha": "b" * 40, "state": "failure", "context": "lint",
                                                   "branches": [{"name": "main"}], "repository": repository()})
        assert body["result"] == "ignored"
        # a commit status on the same branch (GitHub lists the branches whose head is the sha)
        relabeled = {**payload, "issue": {**payload["issue"], "updated_at": "2026-01-02T00:00:00Z"}}
        task2 = (await hooks.post("issues", relabeled, delivery="d-3"))[1]["task_id"]
        status, body = await hooks.post("status", {"sha": "d" * 40, "state": "failure", "context": "lint",
                                                   "branches": [{"name": f"conveyor/{task2}-x"}, {"name": "main"}],
                                                   "repository": repository()})
        assert body == {"result": "signalled", "task_ids": [task2]}
        data = await hooks.probe(task2, until=lambda p: p["signals"])
        assert data["signals"][0]["reason"] == "status lint: failure"
    await server.close()


async def test_ci_fix_task_on_default_branch(client: Client, settings: Settings, github_emulator: GitHubEmulator,
                                            tmp_path: Path) -> None:
    emu = github_emulator
    emu.add_token("tok")
    bare, main_sha = make_bare_repo(tmp_path, "widgets", {"a.txt": "a\n"})
    emu.add_repo("acme", "widgets", bare)
    url = emu.repo_url("acme", "widgets")
    host = GitHubCodeHost(settings, GitHubSettings(token="tok", api_url=emu.api_url), pacing=(0, 0))
    pol = RepoPolicy(name="widgets", url=url, host="github", invokers=["github:alice"], ci_fix_tasks=True)
    server = await hooks_for(client, settings, ConveyorConfig(repos={"widgets": pol}), codehost=lambda: host)
    async with Worker(client, task_queue=settings.task_queue, workflows=[StandIn]), aiohttp.ClientSession() as session:
        hooks = Hooks(session, server, client)
        suite = {"action": "completed", "repository": repository(url),
                 "check_suite": {"head_branch": "main", "head_sha": main_sha, "conclusion": "failure",
                                 "app": {"name": "GitHub Actions"}, "pull_requests": []}}
        status, body = await hooks.post("check_suite", suite)
        assert body["result"] == "started", body
        req = (await hooks.probe(body["task_id"]))["request"]
        assert req["requester"]["kind"] == "ci" and "Fix the failing CI on main" in req["text"] and main_sha in req["text"]
        other = {**suite, "check_suite": {**suite["check_suite"], "app": {"name": "Buildkite"}}}
        status, second = await hooks.post("check_suite", other)  # another suite failing on the same commit
        assert second["result"] == "duplicate" and second["task_id"] == body["task_id"]
        status, ok = await hooks.post("check_suite", {**suite, "check_suite": {**suite["check_suite"], "conclusion": "success"}})
        assert ok["result"] == "ignored"
        # a fork PR whose branch is also called "main" fails its CI: not our main, no task
        fork = {**suite, "check_suite": {**suite["check_suite"], "head_sha": "f" * 40}}
        status, body = await hooks.post("check_suite", fork)
        assert body["result"] == "ignored" and "not the head of main" in body["detail"], body
    await server.close()
    off = await hooks_for(client, settings, ConveyorConfig(repos={"widgets": pol.model_copy(update={"ci_fix_tasks": False})}),
                          codehost=lambda: host)
    async with aiohttp.ClientSession() as session:
        status, body = await Hooks(session, off, client).post("check_suite", suite)
        assert body["result"] == "ignored" and "ci_fix_tasks is off" in body["detail"]
    await off.close()


async def test_agent_comment_on_conveyor_pr_is_a_follow_up(client: Client, settings: Settings,
                                                           github_emulator: GitHubEmulator, tmp_path: Path) -> None:
    emu = github_emulator
    emu.add_token("tok")
    bare, _ = make_bare_repo(tmp_path, "widgets", {"a.txt": "a\n"})
    repo = emu.add_repo("acme", "widgets", bare)
    url = emu.repo_url("acme", "widgets")
    import subprocess

    branch = "conveyor/cv-0123456789ab-fix-it"
    subprocess.run(["git", "-C", str(bare), "branch", branch, "main"], check=True)
    subprocess.run(["git", "-C", str(bare), "branch", "feature", "main"], check=True)
    emu._create_pull(repo, "conveyor-bot", "Fix it", "", branch, "main")
    emu._create_pull(repo, "alice", "Human PR", "", "feature", "main")
    pol = RepoPolicy(name="widgets", url=url, host="github", invokers=["github:alice"])
    host = GitHubCodeHost(settings, GitHubSettings(token="tok", api_url=emu.api_url), pacing=(0, 0))
    server = await hooks_for(client, settings, ConveyorConfig(repos={"widgets": pol}), codehost=lambda: host)
    async with Worker(client, task_queue=settings.task_queue, workflows=[StandIn]), aiohttp.ClientSession() as session:
        hooks = Hooks(session, server, client)
        payload = {"action": "created", "repository": repository(url), "sender": {"login": "alice", "type": "User"},
                   "issue": {"number": 1, "pull_request": {"url": "x"}, "html_url": f"{url}/pull/1"},
                   "comment": {"body": "/agent also handle the empty list", "html_url": f"{url}/pull/1#c1"}}
        status, body = await hooks.post("issue_comment", payload)
        assert body["result"] == "started", body
        req = (await hooks.probe(body["task_id"]))["request"]
        assert req["follow_up_branch"] == branch and req["base"] == "main"
        assert req["text"] == "also handle the empty list" and req["origin"]["github_pr_number"] == 1

        status, body = await hooks.post("issue_comment", {**payload, "issue": {**payload["issue"], "number": 2}})
        assert body["result"] == "ignored" and "not a Conveyor pull request" in body["detail"]
        # a fork's PR whose branch is named like ours: not a Conveyor PR, no follow-up onto our branch
        subprocess.run(["git", "-C", str(bare), "branch", "fork-stand-in", "main"], check=True)
        fork_pr = emu._create_pull(repo, "mallory", "Looks like yours", "", "fork-stand-in", "main")
        fork_pr.head, fork_pr.head_owner = branch, "mallory"
        status, body = await hooks.post("issue_comment", {**payload, "issue": {**payload["issue"], "number": fork_pr.number}})
        assert body["result"] == "ignored" and f"mallory:{branch}" in body["detail"], body
        status, body = await hooks.post("issue_comment", {**payload, "issue": {**payload["issue"], "number": 99}})
        assert status == 502 and "404" in body["error"] and "acme/widgets" in body["error"]
        status, body = await hooks.post("issue_comment", {**payload, "comment": {"body": "looks good"}})
        assert body["result"] == "ignored"
        status, body = await hooks.post("issue_comment", {**payload, "sender": {"login": "ci-bot", "type": "Bot"}})
        assert body["result"] == "ignored"
    await server.close()


def test_refuses_to_run_without_a_secret(settings: Settings) -> None:
    from conveyor.config import ConfigError

    with pytest.raises(ConfigError, match="GITHUB_WEBHOOK_SECRET"):
        GitHubWebhooks(settings, ConveyorConfig(), client=None, secret="")  # type: ignore[arg-type]


def test_cli_subcommand_is_registered() -> None:
    from triggers.cli import build_parser

    args = build_parser().parse_args(["github-webhooks", "--port", "9999"])
    assert args.port == 9999 and args.func.__name__ == "run"
