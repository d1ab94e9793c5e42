"""The Conveyor worker: which workflows and activities the task queue serves, and its tuning."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker

from activities import build_activities
from conveyor.config import Settings
from workflows.task import AgentTaskWorkflow, RevertTaskWorkflow

WORKFLOWS = [AgentTaskWorkflow, RevertTaskWorkflow]


def build_worker(client: Client, settings: Settings, task_queue: str | None = None) -> Worker:
    return Worker(
        client,
        task_queue=task_queue or settings.task_queue,
        workflows=WORKFLOWS,
        activities=build_activities(settings),
        # All activities are async (blocking work goes to threads), so no executor is needed.
        max_concurrent_activities=16,
        graceful_shutdown_timeout=timedelta(seconds=5),
    )


async def run_worker(settings: Settings, client: Client, stop: asyncio.Event | None = None) -> None:
    worker = build_worker(client, settings)
    async with worker:
        await (stop.wait() if stop else asyncio.Event().wait())
