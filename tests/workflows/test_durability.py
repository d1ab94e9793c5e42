"""Durability with real processes: a worker SIGKILLed mid-run, a dev server restarted mid-review."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from conveyor.config import Settings
from conveyor.models import Stage
from temporal.devserver import DevServer
from tests.conftest import decision, git, running_worker, start, wait_stage
from triggers import service

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


async def test_sigkilled_worker_is_replaced_and_the_task_finishes_once(client, temporal_env, settings, policy, bare_repo):
    marker = f"durability-{os.getpid()}-{time.monotonic_ns()}"
    address = client.service_client.config.target_host
    env = {**os.environ, "CONVEYOR_HOME": str(settings.home), "CONVEYOR_TASK_QUEUE": settings.task_queue,
           "CONVEYOR_TEMPORAL_ADDRESS": address, "PYTHONPATH": str(ROOT)}  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "triggers.cli", "worker"], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert worker.stdout is not None and b"worker on task queue" in worker.stdout.readline()
        text = f"sleep 2 # {marker}\necho fixed >> README.md"
        task_id = await start(client, settings, policy, text)
        await wait_stage(client, task_id, Stage.running)
        deadline = time.monotonic() + 20
        while not processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with(marker), "the agent never started"
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        time.sleep(0.5)
        assert not processes_with(marker), "the sandbox outlived its worker (--die-with-parent)"
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    async with running_worker(client, settings):  # a fresh worker picks the task up after the heartbeat timeout
        status = await wait_stage(client, task_id, Stage.awaiting_review, timeout=60)
        await service.signal_task(client, task_id, "approve", decision("carol"))
        status = await wait_stage(client, task_id, Stage.merged)
    branches = [b for b in git(bare_repo, "for-each-ref", "--format=%(refname)", "refs/heads/conveyor/").split() if b]
    assert branches == [f"refs/heads/{status.branch}"]
    assert len(list((settings.home / "changes").rglob("*.json"))) == 1
    assert git(bare_repo, "log", "--merges", "--format=%H", "main").split() == [status.merge_sha]
    attempts = [e for e in status.audit if e.action == "stage" and e.detail == "running"]
    assert len(attempts) == 1  # the workflow saw one run stage; the activity retried underneath


async def test_dev_server_restart_keeps_the_waiting_task(tmp_path, settings, policy, bare_repo):
    restart_settings = Settings(
        home=settings.home, task_queue=settings.task_queue, temporal_port=free_port(), ui_port=free_port()
    )
    server = DevServer(restart_settings, ui=False)
    server.start()
    try:
        await server.wait_ready()
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        async with running_worker(client, restart_settings):
            task_id = await start(client, restart_settings, policy, "echo fixed >> README.md")
            await wait_stage(client, task_id, Stage.awaiting_review)
        server.stop()
        assert restart_settings.db_file.exists()

        server = DevServer(restart_settings, ui=False)
        server.start()
        await server.wait_ready()
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        async with running_worker(client, restart_settings):
            status = await wait_stage(client, task_id, Stage.awaiting_review)
            await service.signal_task(client, task_id, "approve", decision("carol"))
            status = await wait_stage(client, task_id, Stage.merged)
        assert git(bare_repo, "rev-parse", "main") == status.merge_sha
    finally:
        server.stop()
