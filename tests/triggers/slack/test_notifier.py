"""SlackNotifier against the Web API emulator: one progress message updated in place, the review
message, idempotence under activity retries, and which errors are worth retrying."""

from __future__ import annotations

import json

import pytest

from adapters.notifier.slack import SlackNotifier, SlackNotifyError, web_client
from conveyor.config import Settings
from conveyor.models import AgentOutcome, AgentRunResult, ChangeRequest, Identity, Notice, Origin, Stage
from tests.emulators.slack_api import SlackWebAPI

TOKEN = "xoxb-notifier"


def _dump(blocks) -> str:
    return json.dumps(blocks, ensure_ascii=False)


@pytest.fixture
def api():
    with SlackWebAPI(bot_token=TOKEN) as emulator:
        yield emulator


@pytest.fixture
def notifier(api: SlackWebAPI, monkeypatch: pytest.MonkeyPatch, tmp_path) -> SlackNotifier:
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("SLACK_API_URL", api.base_url)  # the notifier must honour SLACK_API_URL
    return SlackNotifier(Settings(home=tmp_path, ui_url="http://ui.test"))


def _notice(api: SlackWebAPI, kind: str, stage: Stage, refs: dict[str, str] | None = None, **kw) -> Notice:
    root = kw.pop("root", None)
    return Notice(
        task_id="cv-0123456789ab",
        kind=kind,  # type: ignore[arg-type]
        stage=stage,
        text=kw.pop("text", ""),
        requester=Identity(kind="slack", id="U100", display="alice"),
        origin=Origin(source="slack", slack_channel="C1", slack_thread_ts=root or ""),
        repo="web",
        refs=refs or {},
        **kw,
    )


def _root(api: SlackWebAPI) -> str:
    return api.seed_message("C1", "<@U100> asked Conveyor: fix it", "UBOT")


CHANGE = ChangeRequest(number=3, branch="conveyor/cv-0123456789ab", head_sha="e" * 40, base="main",
                       url="http://code.test/pr/3", files_changed=2, lines_added=5, lines_removed=1)
RUN = AgentRunResult(outcome=AgentOutcome.ok, summary="Fixed the flaky retry test", files_changed=2, lines_added=5, lines_removed=1, duration_s=42)


def test_progress_is_one_message_updated_in_place(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    root = _root(api)
    refs = notifier.notify(_notice(api, "accepted", Stage.received, root=root))
    ts = refs["slack_progress_ts"]
    refs = notifier.notify(_notice(api, "progress", Stage.running, refs, root=root, text="Agent running in the sandbox"))
    assert refs["slack_progress_ts"] == ts
    running = api.message("C1", ts)["blocks"][0]["text"]["text"]
    assert "Agent running" in running and "Running since <!date^" in running  # elapsed, rendered by Slack
    refs = notifier.notify(_notice(api, "review", Stage.awaiting_review, refs, root=root, text="tests: 12 passed", change=CHANGE, run=RUN))
    assert refs["slack_progress_ts"] == ts
    posts = api.calls_of("chat.postMessage")
    assert [p.args.get("thread_ts") for p in posts] == [root, root]  # progress + review, both in the thread
    assert all(p.token == TOKEN for p in api.calls)
    progress = api.message("C1", ts)
    text = progress["blocks"][0]["text"]["text"]
    assert "Awaiting review" in text and "<http://code.test/pr/3|Change #3>" in text and "+5 −1" in text
    assert "http://ui.test/namespaces/default/workflows/cv-0123456789ab" in _dump(progress["blocks"])
    review = api.message("C1", refs["slack_review_ts"])
    dumped = _dump(review["blocks"])
    assert "Fixed the flaky retry test" in dumped and "tests: 12 passed" in dumped and "http://code.test/pr/3" in dumped
    values = [el["value"] for b in review["blocks"] if b["type"] == "actions" for el in b["elements"]]
    assert [json.loads(v) for v in values] == [{"task_id": "cv-0123456789ab", "head_sha": "e" * 40}] * 2

    refs = notifier.notify(_notice(api, "merged", Stage.merged, refs, root=root, text="Merged as cccc", change=CHANGE, decided_by="bob"))
    merged = api.message("C1", ts)
    assert [el["action_id"] for b in merged["blocks"] if b["type"] == "actions" for el in b["elements"]] == ["conveyor_revert"]
    review = api.message("C1", refs["slack_review_ts"])
    assert not [b for b in review["blocks"] if b["type"] == "actions"]
    assert "Approved by bob · merged" in _dump(review["blocks"])
    assert "Fixed the flaky retry test" in _dump(review["blocks"])  # content kept, buttons gone
    assert len(api.calls_of("chat.postMessage")) == 2


def test_a_retried_first_notice_does_not_post_twice(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    root = _root(api)
    first = notifier.notify(_notice(api, "accepted", Stage.received, root=root))
    # the activity's result was lost (worker crash): Temporal retries with the old (empty) refs
    again = notifier.notify(_notice(api, "accepted", Stage.received, root=root))
    assert again["slack_progress_ts"] == first["slack_progress_ts"]
    refs = notifier.notify(_notice(api, "review", Stage.awaiting_review, again, root=root, change=CHANGE, run=RUN))
    retried = notifier.notify(_notice(api, "review", Stage.awaiting_review, again, root=root, change=CHANGE, run=RUN))
    assert retried["slack_review_ts"] == refs["slack_review_ts"]
    assert len(api.calls_of("chat.postMessage")) == 2


def test_a_deleted_progress_message_is_posted_again(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    root = _root(api)
    refs = notifier.notify(_notice(api, "accepted", Stage.received, root=root))
    api.messages["C1"] = [m for m in api.messages["C1"] if m["ts"] != refs["slack_progress_ts"]]
    refs2 = notifier.notify(_notice(api, "progress", Stage.running, refs, root=root))
    assert refs2["slack_progress_ts"] != refs["slack_progress_ts"]
    assert "Agent running" in _dump(api.message("C1", refs2["slack_progress_ts"])["blocks"])


def test_permanent_and_transient_errors(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    root = _root(api)
    api.fail_next("chat.postMessage", "not_in_channel")
    with pytest.raises(SlackNotifyError, match="not_in_channel") as info:
        notifier.notify(_notice(api, "accepted", Stage.received, root=root))
    assert info.value.retryable is False
    api.fail_next("chat.postMessage", "internal_error")
    with pytest.raises(SlackNotifyError) as info:
        notifier.notify(_notice(api, "accepted", Stage.received, root=root))
    assert info.value.retryable is True
    bad = SlackNotifier(Settings(), client=web_client(token="xoxb-wrong", base_url=api.base_url))
    with pytest.raises(SlackNotifyError, match="invalid_auth") as info:
        bad.notify(_notice(api, "accepted", Stage.received, root=root))
    assert info.value.retryable is False


def test_rate_limits_are_retried_by_the_client(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    root = _root(api)
    api.rate_limit_next("chat.postMessage", retry_after=1)  # HTTP 429 + Retry-After, as Slack throttles
    refs = notifier.notify(_notice(api, "accepted", Stage.received, root=root))
    posts = api.calls_of("chat.postMessage")
    assert len(posts) == 2 and posts[1].at - posts[0].at >= 0.9  # waited as told, then succeeded
    assert api.message("C1", refs["slack_progress_ts"]) is not None


def test_notices_of_tasks_not_from_slack_are_ignored(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    notice = _notice(api, "accepted", Stage.received).model_copy(update={"origin": Origin(source="cli")})
    assert notifier.notify(notice) == {}
    assert api.calls == []


def test_rejected_and_reverted(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    root = _root(api)
    refs = notifier.notify(_notice(api, "review", Stage.awaiting_review, root=root, change=CHANGE, run=RUN))
    refs = notifier.notify(_notice(api, "rejected", Stage.rejected, refs, root=root, text="Rejected by bob: wrong file", decided_by="bob"))
    review = api.message("C1", refs["slack_review_ts"])
    assert "Rejected by bob: wrong file" in _dump(review["blocks"])
    assert not [b for b in review["blocks"] if b["type"] == "actions"]
    assert "Rejected" in api.message("C1", refs["slack_progress_ts"])["blocks"][0]["text"]["text"]
    refs = notifier.notify(_notice(api, "reverted", Stage.reverted, refs, root=root, text="Reverted by bob: http://code.test/commit/ddd"))
    thread_texts = [m["text"] for m in api.thread("C1", root)]
    assert any("http://code.test/commit/ddd" in t for t in thread_texts)
    notifier.notify(_notice(api, "reverted", Stage.reverted, refs, root=root, text="Reverted by bob: http://code.test/commit/ddd"))
    # a retry that lost the refs finds the message by its metadata instead of posting again
    notifier.notify(_notice(api, "reverted", Stage.reverted, {}, root=root, text="Reverted by bob: http://code.test/commit/ddd"))
    assert sum("http://code.test/commit/ddd" in m["text"] for m in api.thread("C1", root)) == 1


def test_info_notices_post_once(api: SlackWebAPI, notifier: SlackNotifier) -> None:
    root = _root(api)
    notice = _notice(api, "info", Stage.no_changes, root=root, text="The agent made no changes; nothing was opened.")
    refs = notifier.notify(notice)
    notifier.notify(notice)  # retried with the same (old) refs
    notifier.notify(notice.model_copy(update={"refs": refs}))
    notes = [m for m in api.thread("C1", root) if "made no changes" in m["text"]]
    assert len(notes) == 1


def test_who_mentions_only_real_slack_user_ids() -> None:
    from adapters.notifier.slack import decision_line, who

    assert who("slack:U0123ABCD") == "<@U0123ABCD>" and who("slack:W0123ABCD") == "<@W0123ABCD>"
    # a principal carrying mrkdwn control text must not become a mention, link or @channel
    for forged in ("slack:U1>|<!channel", "slack:<!here>", "slack:U1|x", "slack:"):
        out = who(forged)
        assert "<" not in out and ">" not in out.replace("&gt;", ""), out
    assert "<!channel>" not in decision_line("approve", "slack:U1><!channel")
