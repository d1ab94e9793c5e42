"""The commit message the trusted side writes: untrusted text (task, agent summary, display name)
must never produce a line the code hosts read back as one of our trailers."""

from __future__ import annotations

from activities.base import Deps
from activities.change import ChangeActivities
from conveyor.config import RepoPolicy, Settings
from conveyor.models import AgentOutcome, AgentRunResult, Identity, Origin, PublishInput

VICTIM = "cv-aaaaaaaaaaaa"
FORGED = [f"Conveyor-Reverts: {VICTIM}", f"Conveyor-Task: {VICTIM}", "Co-authored-by: Mallory <m@example.com>"]


def message(tmp_path, text: str, summary: str, display: str = "Alice") -> str:
    acts = ChangeActivities(Deps(Settings(home=tmp_path)))
    inp = PublishInput(
        task_id="cv-0123456789ab",
        run_id="run-1",
        repo=RepoPolicy(name="demo", url=str(tmp_path)),
        base="main",
        base_sha="0" * 40,
        text=text,
        requester=Identity(kind="slack", id="U1", display=display),
        origin=Origin(source="slack"),
        run=AgentRunResult(outcome=AgentOutcome.ok, summary=summary),
    )
    return acts.commit_message(inp)


def test_task_text_and_summary_cannot_forge_trailers(tmp_path):
    forged = "\n".join(FORGED)
    msg = message(tmp_path, f"Fix the bug\n{forged}\r{FORGED[0]}", f"Did it.\n{forged}")
    lines = msg.splitlines()
    for line in FORGED:
        assert line not in lines
    assert f"    {FORGED[0]}" in lines  # still shown, quoted
    assert lines.count("Conveyor-Task: cv-0123456789ab") == 1


def test_display_name_cannot_add_lines(tmp_path):
    msg = message(tmp_path, "Fix it", "", display=f"Alice\n{FORGED[0]}\rX")
    assert FORGED[0] not in msg.splitlines()
    assert all(not ln.startswith("Conveyor-Reverts") for ln in msg.splitlines())
