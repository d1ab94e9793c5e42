"""Pydantic models that cross a boundary: workflow input/output, signals, activity I/O.

Everything here must stay importable from workflow code (no I/O, no adapters).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from conveyor.config import RepoPolicy

MAX_TASK_CHARS = 20_000
"""Task text longer than this is refused at the trigger: it travels in workflow history."""


class Identity(BaseModel):
    """Who did something. `kind` is the identity provider, `id` its stable user id."""

    kind: Literal["local", "slack", "github", "linear", "ci", "system"]
    id: str = Field(min_length=1, max_length=200)
    display: str = ""

    @property
    def principal(self) -> str:
        return f"{self.kind}:{self.id}"

    def __str__(self) -> str:
        return self.display or self.principal


class Origin(BaseModel):
    """Where a task or signal came from, so replies go back to the same place."""

    source: Literal["cli", "slack", "linear", "github", "ci", "api"]
    delivery_id: str = ""
    slack_channel: str = ""
    slack_thread_ts: str = ""
    slack_response_url: str = ""
    linear_issue_id: str = ""
    github_pr_number: int | None = None
    url: str = ""
    conversation: list[str] = Field(default_factory=list)
    """The triggering conversation (Slack thread messages, Linear description/comments)."""


_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|/\.|[/.]$|\.lock$|\.lock/")


def check_branch(name: str) -> str:
    """A branch name by git's rules (check-ref-format), refused with one line otherwise: it comes
    from the requester (Slack `base:`, CLI --base) and ends up in `refs/heads/<name>`."""
    if not name or len(name) > 200 or _BAD_REF.search(name) or name == "@":
        raise ValueError(f"{name!r} is not a valid branch name")
    return name


class TaskRequest(BaseModel):
    """The one input of AgentTaskWorkflow. The repo policy is snapshotted at start so a PR can
    never change the rules it is judged by."""

    task_id: str
    repo: RepoPolicy
    base: str
    text: str
    requester: Identity
    origin: Origin
    agent: str = "command"
    follow_up_branch: str = ""
    """Set when a task continues an existing change (a `/agent` comment on a Conveyor PR)."""

    @field_validator("base")
    @classmethod
    def _base_ok(cls, base: str) -> str:
        return check_branch(base)

    @field_validator("task_id")
    @classmethod
    def _task_id_ok(cls, task_id: str) -> str:
        # it names files (change records) and workflow ids: no separators, no dot-dot
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", task_id) or ".." in task_id:
            raise ValueError(f"{task_id!r} is not a valid task id")
        return task_id

    @field_validator("text")
    @classmethod
    def _text_ok(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("task text is empty")
        if len(text) > MAX_TASK_CHARS:
            raise ValueError(f"task text is {len(text)} characters; the limit is {MAX_TASK_CHARS}")
        return text


class Stage(str, Enum):
    received = "received"
    context = "context"
    running = "running"
    publishing = "publishing"
    awaiting_review = "awaiting_review"
    awaiting_checks = "awaiting_checks"
    merging = "merging"
    merged = "merged"
    reverting = "reverting"
    reverted = "reverted"
    # terminal, unsuccessful
    rejected = "rejected"
    cancelled = "cancelled"
    expired = "expired"
    no_changes = "no_changes"
    too_large = "too_large"
    needs_rebase = "needs_rebase"
    checks_failed = "checks_failed"
    agent_failed = "agent_failed"
    failed = "failed"


class AuditEvent(BaseModel):
    at: datetime
    action: str
    """invoked, approved, rejected, reverted, cancelled, refused, stage, egress, ..."""
    by: str = ""
    """Who, as shown to people (a display name when there is one: chosen by the user, not unique)."""
    principal: str = ""
    """Who, as policy knows them ("slack:U123"): the part of the trail that cannot be spoofed."""
    via: str = ""
    detail: str = ""


class Decision(BaseModel):
    """Payload of the approve / reject / revert / cancel signals."""

    by: Identity
    via: str = "cli"
    """Where the human clicked: cli, slack:C123, github, ..."""
    reason: str = ""
    head_sha: str = ""
    """For approve: the head the reviewer saw. Merge refuses any other head."""
    emergency: bool = False
    """For revert: merge the revert at once instead of opening it for review (code hosts with review)."""


class ArtifactRef(BaseModel):
    """Reference to a blob in the content-addressed artifact store."""

    uri: str
    size: int
    sha256: str


# ---- activity inputs/outputs -------------------------------------------------------------


class ContextInput(BaseModel):
    task_id: str
    repo: RepoPolicy
    base: str
    text: str
    origin: Origin


class ContextResult(BaseModel):
    base_sha: str
    document: ArtifactRef
    warnings: list[str] = Field(default_factory=list)
    cut: list[str] = Field(default_factory=list)
    suggested_agents_md: str = ""
    """A skeleton AGENTS.md when the repository has none, offered in the change body."""


class AgentRunInput(BaseModel):
    task_id: str
    repo: RepoPolicy
    base_sha: str
    text: str
    agent: str
    context: ArtifactRef
    follow_up_branch: str = ""


class AgentOutcome(str, Enum):
    ok = "ok"
    failed = "failed"  # agent exited non-zero
    timeout = "timeout"
    memory = "memory"
    pids = "pids"
    disk = "disk"
    output_cap = "output_cap"
    budget = "budget"  # turns or cost budget exceeded
    refused = "refused"  # sandbox could not be set up: never run unsandboxed


class AgentRunResult(BaseModel):
    outcome: AgentOutcome
    agent: str = ""
    exit_code: int | None = None
    detail: str = ""
    patch: ArtifactRef | None = None
    """None when the agent changed nothing."""
    transcript: ArtifactRef | None = None
    summary: str = ""
    """The agent's own short 'why' (bounded; the transcript holds the rest)."""
    files_changed: int = 0
    lines_added: int = 0
    lines_removed: int = 0
    cost_usd: float | None = None
    turns: int | None = None
    duration_s: float = 0.0
    sandbox_id: str = ""
    egress: list[str] = Field(default_factory=list)
    """Allowed/denied egress decisions (bounded), for the audit trail."""


class PublishInput(BaseModel):
    task_id: str
    run_id: str
    repo: RepoPolicy
    base: str
    base_sha: str
    text: str
    requester: Identity
    origin: Origin
    run: AgentRunResult
    context_warnings: list[str] = Field(default_factory=list)
    suggested_agents_md: str = ""
    follow_up_branch: str = ""


class ChangeRequest(BaseModel):
    """A branch plus a review record: a pull request on GitHub, a record file on the local host."""

    number: int | None = None
    branch: str
    head_sha: str
    base: str
    url: str = ""
    files_changed: int = 0
    lines_added: int = 0
    lines_removed: int = 0


class ChecksInput(BaseModel):
    repo: RepoPolicy
    change: ChangeRequest


class ChecksResult(BaseModel):
    state: Literal["green", "pending", "failed"]
    failing: list[str] = Field(default_factory=list)
    detail: str = ""


class MergeInput(BaseModel):
    task_id: str
    repo: RepoPolicy
    change: ChangeRequest
    approved_head: str
    approved_by: Identity


class MergeResult(BaseModel):
    outcome: Literal["merged", "needs_rebase", "head_moved", "not_mergeable"]
    merge_sha: str = ""
    detail: str = ""


class CloseInput(BaseModel):
    repo: RepoPolicy
    change: ChangeRequest
    reason: str


class RevertInput(BaseModel):
    task_id: str
    repo: RepoPolicy
    base: str
    merge_sha: str
    change: ChangeRequest | None = None
    decision: Decision


class RevertResult(BaseModel):
    revert_sha: str = ""
    url: str = ""
    already: bool = False
    detail: str = ""
    pending_review: bool = False
    """True when the code host opened a revert for review instead of landing it."""


class Notice(BaseModel):
    """Something a human should hear about: the Notifier renders it (CLI line, Slack message)."""

    task_id: str
    kind: Literal[
        "accepted", "progress", "review", "merged", "rejected", "failed", "reverted", "info", "refused"
    ]
    stage: Stage
    text: str
    requester: Identity
    origin: Origin
    repo: str
    change: ChangeRequest | None = None
    run: AgentRunResult | None = None
    ui_url: str = ""
    decided_by: str = ""
    refs: dict[str, str] = Field(default_factory=dict)
    """Notifier references from earlier notices (Slack message ts...), so updates happen in place."""
    warnings: list[str] = Field(default_factory=list)


class TaskStatus(BaseModel):
    """What the `status` query returns."""

    task_id: str
    repo: str
    base: str
    text: str
    requester: str
    source: str
    stage: Stage
    outcome: str = ""
    detail: str = ""
    branch: str = ""
    change_url: str = ""
    change_number: int | None = None
    head_sha: str = ""
    approved_head: str = ""
    merge_sha: str = ""
    revert_sha: str = ""
    sandbox_id: str = ""
    summary: str = ""
    warnings: list[str] = Field(default_factory=list)
    audit: list[AuditEvent] = Field(default_factory=list)


class TaskResult(BaseModel):
    """What AgentTaskWorkflow returns; also what the after-close revert path reads."""

    status: TaskStatus
    repo: RepoPolicy
    requester: Identity | None = None
    origin: Origin | None = None
    refs: dict[str, str] = Field(default_factory=dict)


class RevertRequest(RevertInput):
    """Input of RevertTaskWorkflow: revert a task whose workflow has already closed."""

    original: TaskStatus | None = None
    """The task's final status, so the revert's status continues its audit trail."""
    requester: Identity | None = None
    origin: Origin | None = None
    refs: dict[str, str] = Field(default_factory=dict)
