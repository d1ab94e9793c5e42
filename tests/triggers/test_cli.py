"""The real `conveyor` CLI as a subprocess against the session's dev server, with a worker in this process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.config import local_user
from conveyor.models import Stage, TaskStatus
from tests.conftest import git, running_worker, wait_stage
from triggers import service

ROOT = Path(__file__).resolve().parents[2]
CHANGE = "sed -i 's/^RETRIES = .*/RETRIES = 3/' app/config.py && echo 'raised retries' > \"$CONVEYOR_SUMMARY_FILE\""
ME = f"local:{local_user()}"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(temporal_env, settings):
    env = {
        **os.environ,
        "CONVEYOR_HOME": str(settings.home),
        "CONVEYOR_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "CONVEYOR_TASK_QUEUE": settings.task_queue,
    }
    env.pop("CONVEYOR_CONFIG", None)
    env.pop("TEMPORAL_ADDRESS", None)

    async def run(*args: str, config: Path | None = None, no_server: bool = False, timeout: float = 60) -> Result:
        proc_env = {**env, "CONVEYOR_CONFIG": str(config)} if config else env
        if no_server:  # no address: the CLI would start an embedded server if it got that far
            proc_env = {k: v for k, v in proc_env.items() if k != "CONVEYOR_TEMPORAL_ADDRESS"}
            with socket.socket() as sock:  # a port nothing listens on
                sock.bind(("127.0.0.1", 0))
                proc_env["CONVEYOR_TEMPORAL_PORT"] = str(sock.getsockname()[1])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "triggers.cli", *args, cwd=ROOT, env=proc_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return Result(proc.returncode, out.decode(), err.decode())

    return run


def one_line_error(result: Result, *needles: str) -> None:
    assert result.code != 0, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conveyor"), result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.err


async def test_run_approve_json_merges(cli, client, settings, bare_repo):
    async with running_worker(client, settings):
        result = await cli("run", "--repo", str(bare_repo), "--approve", "--json", CHANGE)
    assert result.code == 0, result.err
    status = TaskStatus.model_validate(result.json())
    assert status.stage == Stage.merged
    assert status.merge_sha == git(bare_repo, "rev-parse", "main")
    assert git(bare_repo, "show", "main:app/config.py").endswith("RETRIES = 3")
    assert status.requester == ME and status.source == "cli"
    assert any(e.action == "approved" and e.via == "cli" for e in status.audit)


async def test_review_commands(cli, client, settings, bare_repo):
    async with running_worker(client, settings):
        started = await cli("run", "--repo", str(bare_repo), CHANGE)
        assert started.code == 0, started.err
        task_id = re.search(r"task (cv-[0-9a-f]{12}) on ", started.out).group(1)
        assert f"Temporal UI: {settings.task_ui_url(task_id)}" in started.out
        assert "stage: awaiting_review" in started.out and f"conveyor approve {task_id}" in started.out
        assert (await service.task_status(client, task_id)).stage == Stage.awaiting_review  # it stopped there

        approved = await cli("approve", task_id)
        assert approved.code == 0 and f"{task_id}: merged" in approved.out, approved
        merged = await cli("status", task_id, "--json")
        status = TaskStatus.model_validate(merged.json())
        assert status.stage == Stage.merged and status.merge_sha == git(bare_repo, "rev-parse", "main")

        # a second task: rejected (a reason is required), a third: cancelled
        second, third = await asyncio.gather(cli("run", "--repo", str(bare_repo), "echo a > a.txt"), cli("run", "--repo", str(bare_repo), "echo b > b.txt"))
        second_id = re.search(r"task (cv-[0-9a-f]{12})", second.out).group(1)
        third_id = re.search(r"task (cv-[0-9a-f]{12})", third.out).group(1)
        no_reason, blank_reason = await asyncio.gather(cli("reject", second_id), cli("reject", second_id, "--reason", "  "))
        one_line_error(no_reason, "--reason")
        one_line_error(blank_reason, "reason is required")
        rejected, cancelled = await asyncio.gather(cli("reject", second_id, "--reason", "not like this"), cli("cancel", third_id))
        assert rejected.code == 0 and f"{second_id}: rejected (not like this)" in rejected.out, rejected
        assert cancelled.code == 0 and f"{third_id}: cancelled" in cancelled.out, cancelled

        reverted = await cli("revert", task_id, "--reason", "broke uploads")
        assert reverted.code == 0 and f"{task_id}: reverted" in reverted.out, reverted
        assert git(bare_repo, "show", "main:app/config.py").endswith("RETRIES = 1")
        listing, human, late = await asyncio.gather(cli("list", "--json"), cli("status", task_id), cli("approve", third_id))
    one_line_error(late, f"task {third_id} is already finished")
    stages = {t["task_id"]: t["stage"] for t in listing.json()}
    assert stages[second_id] == "rejected" and stages[third_id] == "cancelled"
    assert stages[task_id] in ("merged", "reverted")  # visibility may lag the revert by a moment
    assert human.code == 0 and human.out.startswith(f"{task_id}  reverted")
    assert f"revert_requested by {local_user()} (local:{local_user()}) via cli broke uploads" in human.out


async def test_errors_are_one_line(cli, client, settings, bare_repo, tmp_path):
    config = tmp_path / "conveyor.toml"
    config.write_text(f'[repos.demo]\nurl = "{bare_repo}"\ninvokers = ["*"]\n')
    empty, unknown_repo, bad_id, unknown_id, bad_config = await asyncio.gather(
        cli("run", "--repo", str(bare_repo), "   "),
        cli("run", "--repo", "nosuchrepo", "true", config=config),
        cli("status", "nope", no_server=True),  # checked before any server is contacted or started
        cli("approve", "cv-000000000000"),
        cli("run", "--repo", "demo", "true", config=tmp_path / "missing.toml"),
    )
    one_line_error(empty, "empty")
    one_line_error(unknown_repo, "unknown repository 'nosuchrepo'", "known: demo")
    one_line_error(bad_id, "'nope' is not a Conveyor task id")
    assert not (settings.home / "temporal.db").exists()
    one_line_error(unknown_id, "no task cv-000000000000")
    one_line_error(bad_config, "CONVEYOR_CONFIG")
    config.write_text('[repos.demo]\nurl = "x"\nmax_turns = "lots"\n')
    one_line_error(await cli("run", "--repo", "demo", "true", config=config), "repos.demo.max_turns (line 3)")
    one_line_error(await cli("frobnicate"), "invalid choice")


async def test_unauthorized_approve_is_refused_and_audited(cli, client, settings, bare_repo, tmp_path):
    config = tmp_path / "conveyor.toml"
    config.write_text(
        f'[repos.demo]\nurl = "{bare_repo}"\ninvokers = ["*"]\napprovers = ["local:someone-else"]\nreverters = ["*"]\n'
    )
    base = git(bare_repo, "rev-parse", "main")
    async with running_worker(client, settings):
        started = await cli("run", "--repo", "demo", CHANGE, config=config)
        assert started.code == 0, started.err
        task_id = re.search(r"task (cv-[0-9a-f]{12}) on demo@main", started.out).group(1)
        approve = await cli("approve", task_id, config=config)
        status = TaskStatus.model_validate((await cli("status", task_id, "--json", config=config)).json())
        await service.signal_task(client, task_id, "cancel", _me_decision())
        await wait_stage(client, task_id, Stage.cancelled)
    assert approve.code == 1
    assert "refused: approve: not an approver for this repository" in approve.err
    assert status.stage == Stage.awaiting_review
    refusals = [e for e in status.audit if e.action == "refused"]
    assert len(refusals) == 1 and refusals[0].by == local_user() and refusals[0].via == "cli"
    assert git(bare_repo, "rev-parse", "main") == base


def _me_decision():
    from conveyor.models import Decision, Identity

    return Decision(by=Identity(kind="local", id=local_user()), via="test")
