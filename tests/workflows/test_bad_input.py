"""Hostile and broken input through the trigger API and the real pipeline (dev server, git, bubblewrap)."""

from __future__ import annotations

import random
import subprocess
import uuid
from pathlib import Path

import pytest

from activities.change import branch_name, slug
from conveyor.config import ConfigError, RepoPolicy, adhoc_repo_policy
from conveyor.models import MAX_TASK_CHARS, Origin, Stage
from conveyor.models import TaskResult
from tests.conftest import decision, git, person, running_worker, start, wait_stage
from triggers import service


def ref_ok(name: str) -> bool:
    branch = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True)
    full = subprocess.run(["git", "check-ref-format", f"refs/heads/{name}"], capture_output=True)
    return branch.returncode == 0 and full.returncode == 0


@pytest.mark.parametrize("text", ["", " ", "\n\t  \r\n", "\u3000"])
def test_empty_task_is_bad(policy, text):
    with pytest.raises(service.BadTask, match="empty"):
        service.build_request(policy, text, person("alice"), Origin(source="cli"))


async def test_huge_task_is_bad_and_starts_nothing(client, policy):
    task_id = service.new_task_id()
    with pytest.raises(service.BadTask) as err:
        service.build_request(policy, "x" * 1_000_000, person("alice"), Origin(source="cli"), task_id=task_id)
    assert f"{MAX_TASK_CHARS:,}" in str(err.value) and "1,000,000" in str(err.value)
    with pytest.raises(service.UnknownTask):
        await service.task_status(client, task_id)
    # exactly at the limit is fine
    assert len(service.build_request(policy, "y" * MAX_TASK_CHARS, person("alice"), Origin(source="cli")).text) == MAX_TASK_CHARS


def test_non_invoker_is_refused(policy):
    with pytest.raises(service.Refused, match="may not start tasks"):
        service.build_request(policy, "true", person("mallory"), Origin(source="cli"))


NASTY = [
    "../../etc/passwd", "; rm -rf / ;", "`id`", "$(touch /tmp/x)", "a\nb\r\nc", "@{-1}", "HEAD@{0}", "a..b",
    "~^:?*[\\", "refs/heads/main", ".lock", "x.lock", "-rf", "--upload-pack=evil", "/", "//", ".", "..", "",
    " ", "\0", "\x7f\x01\x1b[31m", "ÄÖÜ ünïcödé 中文 🚀", "a" * 500, "-" * 60, "a/.b", "foo.", "@", "1" * 41,
    "Fix the bug in ../src/main.py; then `make test` && echo $HOME",
]  # fmt: skip


def test_slug_and_branch_name_are_always_valid_refs():
    rng = random.Random(1234)
    alphabet = "aZ09-_./\\~^:?*[]@{}; `$()'\"\n\t\r\0 é中🚀\x7f"
    texts = NASTY + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    for text in texts:
        s = slug(text)
        assert s and len(s) <= 40 and set(s) <= set("abcdefghijklmnopqrstuvwxyz0123456789-"), (text, s)
        assert not s.startswith("-") and not s.endswith("-"), (text, s)
        name = branch_name(service.new_task_id(), text)
        assert ref_ok(name), (text, name)
    assert slug("Fix the bug in ../src/main.py") == "fix-the-bug-in-src-main-py"


async def test_metacharacters_run_only_inside_the_sandbox(client, settings, policy, bare_repo):
    marker = Path(f"/tmp/PWNED-{uuid.uuid4().hex}")
    # For the `command` agent the text IS a shell script: every line really runs, in the sandbox.
    text = (
        f"touch {marker} && test -e {marker} && echo inside > found.txt; "
        f"echo \"$(touch {marker}-sub)\" `touch {marker}-tick` >> found.txt\n"
        "printf '%s\\n' '../ ; `x` @{ .. ~^:?*[\\ refs/heads/main HEAD@{1}' >> found.txt\n"
        "echo 'wrote notes with ../ and $(subshells)' > \"$CONVEYOR_SUMMARY_FILE\""
    )
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, text)
        status = await wait_stage(client, task_id, Stage.awaiting_review, Stage.failed, Stage.agent_failed)
        assert status.stage == Stage.awaiting_review, status.detail
        await service.signal_task(client, task_id, "cancel", decision("alice"))
        await wait_stage(client, task_id, Stage.cancelled)
    assert ref_ok(status.branch) and status.branch.startswith(f"conveyor/{task_id}-")
    assert git(bare_repo, "rev-parse", status.branch) == status.head_sha
    found = git(bare_repo, "show", f"{status.head_sha}:found.txt")
    assert found.startswith("inside")  # the touch really ran, and saw its own file
    assert "~^:?*[\\ refs/heads/main HEAD@{1}" in found
    for leaked in (marker, Path(f"{marker}-sub"), Path(f"{marker}-tick")):
        assert not leaked.exists(), f"{leaked} was created on the host"
    assert status.text == text  # the text travelled unmodified


async def test_unknown_agent_fails_fast_and_clearly(client, settings, policy):
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "true", agent="no-such-agent")
        status = await wait_stage(client, task_id, Stage.failed, Stage.agent_failed, timeout=15)
        handle = client.get_workflow_handle(task_id, result_type=TaskResult)
        result = await handle.result()
        history = await handle.fetch_history()
    assert status.stage == Stage.failed and result.status.stage == Stage.failed
    assert "unknown agent 'no-such-agent'" in status.detail and "command" in status.detail  # names the known ones
    attempts = [e.activity_task_started_event_attributes.attempt for e in history.events if e.HasField("activity_task_started_event_attributes")]
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events if e.HasField("activity_task_scheduled_event_attributes")]
    assert scheduled.count("run_agent") == 1 and max(attempts) == 1  # not retried


def test_missing_repo_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        adhoc_repo_policy(str(tmp_path / "no-such-repo"))


async def test_repo_path_vanished_fails_clearly(client, settings, tmp_path):
    policy = RepoPolicy(name="gone", url=str(tmp_path / "gone.git"), invokers=["*"], approvers=["*"], reverters=["*"])
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, "true")
        status = await wait_stage(client, task_id, Stage.failed, timeout=15)
    assert "does not exist" in status.detail


async def test_odd_but_legal_file_names_reach_review(client, settings, policy, bare_repo):
    # spaces, unicode, a leading dash, quotes and a tab: git quotes or tab-terminates these names
    text = (
        "mkdir -p 'docs/release notes' && echo a > 'docs/release notes/v 1.md' && echo b > 'docs/héllo wörld.md' "
        "&& echo c > ./-dash.txt && printf d > \"docs/q'uo\\\"te\\ttab.txt\""
    )
    async with running_worker(client, settings):
        task_id = await start(client, settings, policy, text)
        status = await wait_stage(client, task_id, Stage.awaiting_review, Stage.failed, Stage.agent_failed)
        assert status.stage == Stage.awaiting_review, status.detail
        await service.signal_task(client, task_id, "approve", decision("carol"))
        status = await wait_stage(client, task_id, Stage.merged)
    names = git(bare_repo, "-c", "core.quotePath=false", "ls-tree", "-r", "--name-only", "main").splitlines()
    assert {"docs/release notes/v 1.md", "docs/héllo wörld.md", "-dash.txt"} <= set(names)
    assert any(n.startswith('"docs/q') or n.startswith("docs/q'uo") for n in names), names
