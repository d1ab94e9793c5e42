"""Slack notifier: one progress message per task in the requester's thread, updated in place,
plus a Block Kit review message with Approve / Reject buttons.

Idempotent under activity retries: every message we create carries Slack message metadata
(`conveyor_progress` / `conveyor_review` with the task id), so a retried first notice finds the
message an earlier attempt created (conversations.replies) and updates it instead of posting twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler

from conveyor.config import Settings
from conveyor.models import Notice, Stage

log = logging.getLogger(__name__)

PROGRESS_EVENT = "conveyor_progress"
REVIEW_EVENT = "conveyor_review"
NOTE_EVENT = "conveyor_note"
ACTIONS_BLOCK = "conveyor_actions"
APPROVE_ACTION = "conveyor_approve"
REJECT_ACTION = "conveyor_reject"
REVERT_ACTION = "conveyor_revert"
DECISION_BLOCK = "conveyor_decision"

REF_PROGRESS = "slack_progress_ts"
REF_REVIEW = "slack_review_ts"
REF_THREAD = "slack_thread_ts"

# Slack errors that no retry can fix: the activity should give up on Slack, not the task.
_PERMANENT = {
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "missing_scope",
    "invalid_blocks",
    "msg_too_long",
    "no_text",
    "thread_not_found",
    "restricted_action",
}

_SECTION_LIMIT = 2900  # Slack caps section text at 3000 characters

_TITLES: dict[Stage, str] = {
    Stage.received: ":inbox_tray: Queued",
    Stage.context: ":mag: Building context",
    Stage.running: ":gear: Agent running",
    Stage.publishing: ":package: Opening the change",
    Stage.awaiting_review: ":eyes: Awaiting review",
    Stage.awaiting_checks: ":hourglass_flowing_sand: Waiting for checks",
    Stage.merging: ":twisted_rightwards_arrows: Merging",
    Stage.merged: ":white_check_mark: Merged",
    Stage.reverting: ":rewind: Reverting",
    Stage.reverted: ":rewind: Reverted",
    Stage.rejected: ":no_entry_sign: Rejected",
    Stage.cancelled: ":no_entry: Cancelled",
    Stage.expired: ":alarm_clock: Review expired",
    Stage.no_changes: ":zero: No changes",
    Stage.too_large: ":elephant: Change too large",
    Stage.needs_rebase: ":warning: Needs a rebase",
    Stage.checks_failed: ":x: Checks failed",
    Stage.agent_failed: ":x: Agent failed",
    Stage.failed: ":x: Failed",
}


class SlackNotifyError(Exception):
    """A Slack Web API failure. `retryable` tells the activity whether trying again can help."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def _clip(text: str, limit: int = _SECTION_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def escape(text: str) -> str:
    """Slack mrkdwn control characters: user-provided text must not become mentions or links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_SLACK_USER_ID = re.compile(r"[UW][A-Z0-9]{2,20}")


def who(display_or_principal: str) -> str:
    """Render an actor: `slack:U123` becomes a mention, anything else stays plain. Only a real
    Slack user id becomes a mention: `slack:U1>|<!channel` would otherwise ping the channel."""
    kind, _, ident = display_or_principal.partition(":")
    if kind == "slack" and _SLACK_USER_ID.fullmatch(ident):
        return f"<@{ident}>"
    return escape(display_or_principal)


def button_value(task_id: str, head_sha: str = "") -> str:
    return json.dumps({"task_id": task_id, "head_sha": head_sha}, separators=(",", ":"))


def parse_button_value(value: str) -> tuple[str, str]:
    """(task_id, head_sha) from a button value; ValueError on anything else."""
    try:
        data = json.loads(value)
        return str(data["task_id"]), str(data.get("head_sha", ""))
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"not a Conveyor button value: {value[:80]!r}") from None


def change_line(notice: Notice) -> str:
    change = notice.change
    if change is None:
        return ""
    label = f"Change #{change.number}" if change.number else f"Branch {change.branch}"
    link = f"<{change.url}|{escape(label)}>" if change.url else escape(label)
    return (
        f"{link} · {change.files_changed} file{'s' if change.files_changed != 1 else ''} changed, "
        f"+{change.lines_added} −{change.lines_removed}"
    )


def progress_blocks(notice: Notice) -> tuple[str, list[dict[str, Any]]]:
    """The one progress message of a task: (fallback text, blocks)."""
    title = _TITLES.get(notice.stage, notice.stage.value)
    if notice.kind == "failed" and notice.stage not in _TITLES:
        title = ":x: Failed"
    head = f"*{title}* · `{notice.task_id}` on *{escape(notice.repo)}*"
    lines = [head]
    if notice.text:
        lines.append(escape(notice.text))
    if notice.stage == Stage.running and notice.run is None:
        # Slack renders this in the reader's time zone; with the message's own "edited" mark it
        # tells how long the agent has been running without a chat.update per second.
        now = int(time.time())
        lines.append(f"Running since <!date^{now}^{{time}}|{time.strftime('%H:%M UTC', time.gmtime(now))}>")
    if notice.run is not None and notice.run.duration_s:
        lines.append(f"Agent ran for {notice.run.duration_s:.0f}s")
    if cl := change_line(notice):
        lines.append(cl)
    if notice.decided_by and notice.kind == "merged":
        # (rejections and reverts name their decider in the text already; decided_by is the reviewer)
        lines.append(f"Approved by {who(notice.decided_by)}")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip("\n".join(lines))}},
    ]
    for warning in notice.warnings[:5]:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(f":warning: {escape(warning)}", 1900)}]})
    if notice.ui_url:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{notice.ui_url}|Temporal UI> · requested by {who(notice.requester.principal)}"}]}
        )
    if notice.kind == "merged" and notice.stage == Stage.merged:
        blocks.append(
            {
                "type": "actions",
                "block_id": ACTIONS_BLOCK,
                "elements": [
                    {
                        "type": "button",
                        "action_id": REVERT_ACTION,
                        "style": "danger",
                        "text": {"type": "plain_text", "text": "Revert"},
                        "value": button_value(notice.task_id, notice.change.head_sha if notice.change else ""),
                        "confirm": {
                            "title": {"type": "plain_text", "text": "Revert this change?"},
                            "text": {"type": "mrkdwn", "text": f"This reverts the merge of `{notice.task_id}`."},
                            "confirm": {"type": "plain_text", "text": "Revert"},
                            "deny": {"type": "plain_text", "text": "Cancel"},
                            "style": "danger",
                        },
                    }
                ],
            }
        )
    fallback = f"{title.split(' ', 1)[-1]}: {notice.task_id} on {notice.repo}"
    return fallback, blocks


def review_blocks(notice: Notice) -> tuple[str, list[dict[str, Any]]]:
    """The review message: summary, files changed, test results, links, Approve / Reject."""
    change = notice.change
    head_sha = change.head_sha if change else ""
    summary = (notice.run.summary if notice.run and notice.run.summary else "") or notice.text or "(no summary)"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(f"Review: {notice.repo} · {notice.task_id}", 150)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip("*Summary*\n" + escape(summary))}},
    ]
    fields = []
    if change is not None:
        fields.append({"type": "mrkdwn", "text": f"*Files changed*\n{change.files_changed} (+{change.lines_added} −{change.lines_removed})"})
        fields.append({"type": "mrkdwn", "text": f"*Head*\n`{change.head_sha[:12]}` on `{escape(change.branch)}`"})
    if notice.text and notice.text != summary:
        # test results travel in the notice text / run summary (the agent's own report)
        fields.append({"type": "mrkdwn", "text": _clip("*Status / tests*\n" + escape(notice.text), 1900)})
    fields.append({"type": "mrkdwn", "text": f"*Requested by*\n{who(notice.requester.principal)}"})
    blocks.append({"type": "section", "fields": fields[:10]})
    for warning in notice.warnings[:5]:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _clip(f":warning: {escape(warning)}", 1900)}]})
    links = []
    if change is not None and change.url:
        links.append(f"<{change.url}|{'Pull request #' + str(change.number) if change.number else 'Change'}>")
    if notice.ui_url:
        links.append(f"<{notice.ui_url}|Temporal UI>")
    if links:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(links)}]})
    value = button_value(notice.task_id, head_sha)
    blocks.append(
        {
            "type": "actions",
            "block_id": ACTIONS_BLOCK,
            "elements": [
                {"type": "button", "action_id": APPROVE_ACTION, "style": "primary",
                 "text": {"type": "plain_text", "text": "Approve"}, "value": value},
                {"type": "button", "action_id": REJECT_ACTION, "style": "danger",
                 "text": {"type": "plain_text", "text": "Reject"}, "value": value},
            ],
        }
    )
    return f"Review requested: {notice.task_id} on {notice.repo}", blocks


def decided_blocks(blocks: list[dict[str, Any]], line: str) -> list[dict[str, Any]]:
    """A decided review message: same content, no buttons, one line saying who decided."""
    kept = [b for b in blocks if b.get("block_id") not in (ACTIONS_BLOCK, DECISION_BLOCK) and b.get("type") != "actions"]
    kept.append({"type": "context", "block_id": DECISION_BLOCK, "elements": [{"type": "mrkdwn", "text": _clip(line, 1900)}]})
    return kept


def decision_line(kind: str, by: str, reason: str = "") -> str:
    if kind == "approve" or kind == "merged":
        line = f":white_check_mark: Approved by {who(by)}"
        if kind == "merged":
            line += " · merged"
    elif kind in ("reject", "rejected"):
        line = f":no_entry_sign: Rejected by {who(by)}"
    elif kind == "reverted":
        line = f":rewind: Merged, then reverted by {who(by)}"
    else:
        line = f":information_source: Closed: {kind}" + (f" by {who(by)}" if by else "")
    if reason:
        line += f": {escape(reason)}"
    return line


def _decision_text(blocks: list[dict[str, Any]]) -> str:
    for block in blocks:
        if block.get("block_id") == DECISION_BLOCK:
            elements = block.get("elements") or [{}]
            return str(elements[0].get("text", ""))
    return ""


def web_client(settings: Settings | None = None, token: str | None = None, base_url: str | None = None) -> WebClient:
    slack = (settings or Settings()).slack()
    kwargs: dict[str, Any] = {"token": token or slack.bot_token, "timeout": 10}
    if base_url or slack.api_url:
        url = base_url or slack.api_url
        kwargs["base_url"] = url if url.endswith("/") else url + "/"
    client = WebClient(**kwargs)
    # Transient network errors and 429s are retried by the client itself, honouring Retry-After.
    client.retry_handlers = [ConnectionErrorRetryHandler(max_retry_count=2), RateLimitErrorRetryHandler(max_retry_count=3)]
    return client


class SlackNotifier:
    name = "slack"

    def __init__(self, settings: Settings | None = None, client: WebClient | None = None) -> None:
        self.settings = settings or Settings()
        self.client = client or web_client(self.settings)

    # ---- protocol ------------------------------------------------------------------------------

    def notify(self, notice: Notice) -> dict[str, str]:
        channel = notice.origin.slack_channel
        if not channel:
            return dict(notice.refs)  # not a Slack task: nothing to say here
        refs = dict(notice.refs)
        if not notice.ui_url:
            notice = notice.model_copy(update={"ui_url": self.settings.task_ui_url(notice.task_id)})
        thread_ts = notice.origin.slack_thread_ts or refs.get(REF_THREAD, "")
        try:
            progress_ts = self._upsert(
                channel, thread_ts, refs.get(REF_PROGRESS, ""), PROGRESS_EVENT, notice.task_id, "", *progress_blocks(notice)
            )
            refs[REF_PROGRESS] = progress_ts
            if not thread_ts:
                # No thread to reply in (a task started elsewhere but pointed at a channel):
                # the progress message becomes the thread.
                refs[REF_THREAD] = thread_ts = progress_ts
            if notice.kind == "review":
                head = notice.change.head_sha if notice.change else ""
                review_ts = refs.get(REF_REVIEW, "") if refs.get("slack_review_head") == head else ""
                refs[REF_REVIEW] = self._upsert(channel, thread_ts, review_ts, REVIEW_EVENT, notice.task_id, head, *review_blocks(notice))
                refs["slack_review_head"] = head
            elif notice.kind in ("merged", "rejected", "failed", "reverted") and refs.get(REF_REVIEW):
                self._close_review(channel, thread_ts, refs[REF_REVIEW], notice)
            if notice.kind in ("info", "refused") or (notice.kind == "reverted" and notice.text):
                # Its own thread message (people get notified): the revert commit's link, a refusal.
                # Keyed by content so a retried activity finds the first attempt's message.
                prefix = ":rewind: " if notice.kind == "reverted" else ""
                text = prefix + (escape(notice.text) or notice.kind)
                key = hashlib.sha256(f"{notice.kind}\0{notice.text}".encode()).hexdigest()[:16]
                if f"slack_note_{key}" not in refs:
                    refs[f"slack_note_{key}"] = self._upsert(
                        channel, thread_ts, "", NOTE_EVENT, notice.task_id, key, text,
                        [{"type": "section", "text": {"type": "mrkdwn", "text": _clip(text)}}],
                    )
        except SlackApiError as exc:
            error = str(exc.response.get("error", "")) if exc.response is not None else ""
            raise SlackNotifyError(f"Slack refused the notice for {notice.task_id}: {error or exc}", retryable=error not in _PERMANENT) from exc
        return refs

    # ---- internals ------------------------------------------------------------------------------

    def _post(self, channel: str, thread_ts: str, text: str, blocks: list | None, metadata: dict | None) -> str:
        kwargs: dict[str, Any] = {"channel": channel, "text": text, "unfurl_links": False, "unfurl_media": False}
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        if blocks is not None:
            kwargs["blocks"] = blocks
        if metadata is not None:
            kwargs["metadata"] = metadata
        return str(self.client.chat_postMessage(**kwargs)["ts"])

    def _find(self, channel: str, thread_ts: str, event_type: str, task_id: str, head: str) -> str:
        """The ts of a message an earlier (retried) attempt already created, or ''."""
        if not thread_ts:
            return ""
        try:
            resp = self.client.conversations_replies(channel=channel, ts=thread_ts, include_all_metadata=True, limit=200)
        except SlackApiError as exc:
            log.warning("conversations.replies failed (%s); assuming no earlier message", exc.response.get("error"))
            return ""
        for msg in resp.get("messages", []):
            meta = msg.get("metadata") or {}
            payload = meta.get("event_payload") or {}
            if meta.get("event_type") == event_type and payload.get("task_id") == task_id and payload.get("head_sha", "") == head:
                return str(msg["ts"])
        return ""

    def _upsert(self, channel: str, thread_ts: str, ts: str, event_type: str, task_id: str, head: str,
                text: str, blocks: list[dict[str, Any]]) -> str:
        metadata = {"event_type": event_type, "event_payload": {"task_id": task_id, "head_sha": head}}
        ts = ts or self._find(channel, thread_ts, event_type, task_id, head)
        if ts:
            try:
                self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks, metadata=metadata)
                return ts
            except SlackApiError as exc:
                if exc.response.get("error") != "message_not_found":
                    raise
                # somebody deleted it: post a fresh one below
        return self._post(channel, thread_ts, text, blocks, metadata)

    def _close_review(self, channel: str, thread_ts: str, review_ts: str, notice: Notice) -> None:
        # Keep what the reviewer saw: re-read the message's own blocks, drop the buttons.
        blocks: list[dict[str, Any]] | None = None
        if thread_ts:
            try:
                resp = self.client.conversations_replies(channel=channel, ts=thread_ts, limit=200)
                for msg in resp.get("messages", []):
                    if msg.get("ts") == review_ts:
                        blocks = msg.get("blocks") or []
            except SlackApiError as exc:
                log.warning("conversations.replies failed (%s)", exc.response.get("error"))
        if blocks is None:
            blocks = review_blocks(notice.model_copy(update={"kind": "review"}))[1]
        reason = notice.text if notice.kind == "failed" else ""
        line = decision_line(notice.kind, notice.decided_by, reason)
        if notice.kind == "rejected" and notice.text:
            line = f":no_entry_sign: {escape(notice.text)}"  # "Rejected by X: reason", from the workflow
        earlier = _decision_text(blocks)
        # The Slack app already wrote "Approved by <@U…>" when the button was clicked; keep that
        # line (it mentions the person) and add the outcome rather than replace it.
        if earlier and notice.kind == "merged" and earlier.startswith(":white_check_mark: Approved by"):
            line = earlier.split(" · ", 1)[0] + " · merged"
        elif earlier and notice.kind == "rejected" and earlier.startswith(":no_entry_sign: Rejected by"):
            line = earlier
        elif earlier and notice.kind == "reverted":
            line = earlier.split(" · ", 1)[0] + " · merged, then reverted"
        try:
            self.client.chat_update(channel=channel, ts=review_ts, text=line, blocks=decided_blocks(blocks, line))
        except SlackApiError as exc:
            if exc.response.get("error") != "message_not_found":
                raise
