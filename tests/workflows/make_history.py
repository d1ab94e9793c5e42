"""Regenerate the committed histories replayed by test_replay.py (run by hand after an
intentional workflow change, never from the test suite):

    python -m tests.workflows.make_history
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from conveyor import search
from conveyor.config import RepoPolicy, Settings
from conveyor.models import Decision, Identity, Origin, Stage
from temporal.demo import FILES, make_repo
from tests.conftest import temporal_cli
from triggers import service
from workers.main import build_worker

OUT = Path(__file__).parent / "histories"


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-history-"))
    repo = make_repo(tmp / "origin.git", FILES)
    policy = RepoPolicy(name="demo", url=str(repo), invokers=["*"], approvers=["*"], reverters=["*"], revert_window_s=5)
    settings = Settings(home=tmp / "home", task_queue="history")
    alice = Identity(kind="local", id="alice", display="Alice")
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(), data_converter=pydantic_data_converter, search_attributes=search.ALL_KEYS
    )
    try:
        client = env.client
        async with build_worker(client, settings):
            request = service.build_request(policy, "echo fixed >> README.md", alice, Origin(source="cli"), task_id="cv-000000000001")
            await service.start_task(client, request, settings)
            while (await service.task_status(client, request.task_id)).stage != Stage.awaiting_review:
                await asyncio.sleep(0.05)
            await service.signal_task(client, request.task_id, "approve", Decision(by=alice, via="history"))
            while (await service.task_status(client, request.task_id)).stage != Stage.merged:
                await asyncio.sleep(0.05)
            await service.signal_task(client, request.task_id, "revert", Decision(by=alice, via="history", reason="replay"))
            await client.get_workflow_handle(request.task_id).result()
            history = await client.get_workflow_handle(request.task_id).fetch_history()
        OUT.mkdir(exist_ok=True)
        (OUT / "task_merged_reverted.json").write_text(history.to_json())
        print(f"wrote {OUT / 'task_merged_reverted.json'}")
    finally:
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
