"""Stages 3-6 on the code host: publish the change, read its checks, merge, close, revert."""

from __future__ import annotations

import asyncio
import re

from temporalio import activity

from activities.base import Deps, host_errors
from adapters.codehost.base import PublishRequest
from adapters.patch import validate_patch
from conveyor.models import (
    ChangeRequest,
    ChecksInput,
    ChecksResult,
    CloseInput,
    Identity,
    MergeInput,
    MergeResult,
    PublishInput,
    RevertInput,
    RevertResult,
)

SUMMARY_CHARS = 3000
TITLE_CHARS = 72


def slug(text: str, limit: int = 40) -> str:
    """A ref-safe slug from untrusted task text: [a-z0-9-] only, never empty."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:limit].strip("-")
    return out or "task"


def branch_name(task_id: str, text: str) -> str:
    return f"conveyor/{task_id}-{slug(text)}"


def headline(summary: str) -> str:
    """The first line of prose in a (markdown) summary."""
    return next((ln.strip() for ln in summary.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")


def one_line(text: str, limit: int = TITLE_CHARS) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def quoted(text: str) -> str:
    """Untrusted text (task, agent summary) indented inside a commit message, so none of its lines
    can pose as one of our trailers (Conveyor-Task:, Conveyor-Reverts:, Co-authored-by:), which the
    code hosts read back to find a change, a merge or a revert."""
    return "\n".join(f"    {ln}" if ln.strip() else "" for ln in text.splitlines())


def coauthor(identity: Identity) -> str:
    name = " ".join(re.sub(r"[<>\x00-\x1f\x7f]", " ", identity.display or identity.id).split())
    email = f"{identity.kind}-{re.sub(r'[^A-Za-z0-9._-]', '', identity.id)}@users.noreply.conveyor"
    return f"{name} <{email}>"


class ChangeActivities:
    def __init__(self, deps: Deps):
        self.deps = deps

    def run_url(self, task_id: str, run_id: str) -> str:
        return f"{self.deps.settings.task_ui_url(task_id)}/{run_id}"

    def commit_message(self, inp: PublishInput) -> str:
        summary = inp.run.summary.strip()[:SUMMARY_CHARS]
        parts = [
            f"conveyor: {one_line(inp.text)}",
            "",
            f"Task ({inp.origin.source}, requested by {one_line(str(inp.requester), 200)}):",
            quoted(inp.text.strip()[:2000]),
        ]
        if summary:
            parts += ["", "Agent summary:", quoted(summary)]
        parts += [
            "",
            f"Co-authored-by: {coauthor(inp.requester)}",
            f"Conveyor-Task: {inp.task_id}",
            f"Conveyor-Run: {self.run_url(inp.task_id, inp.run_id)}",
            f"Conveyor-Requested-By: {inp.requester.principal}",
        ]
        return "\n".join(parts) + "\n"

    def change_body(self, inp: PublishInput) -> str:
        run = inp.run
        cost = f", cost ${run.cost_usd:.2f}" if run.cost_usd is not None else ""
        turns = f", {run.turns} turns" if run.turns is not None else ""
        warnings = "\n".join(f"- {w}" for w in inp.context_warnings) or "- none"
        risk = []
        if run.files_changed > 20 or run.lines_added + run.lines_removed > 1000:
            risk.append("- large change: review carefully or split it")
        if inp.repo.sandbox.allow_domains:
            risk.append(f"- the agent had network access to: {', '.join(inp.repo.sandbox.allow_domains)}")
        return "\n".join(
            [
                "## Task",
                inp.text.strip()[:4000],
                "",
                f"Requested by **{inp.requester}** via {inp.origin.source}" + (f" ({inp.origin.url})" if inp.origin.url else ""),
                "",
                "## What the agent did and why",
                run.summary.strip()[:SUMMARY_CHARS] or "(no summary)",
                "",
                "## Run",
                f"Agent `{run.agent or inp.repo.agent}`: {run.duration_s:.1f} s{turns}{cost}; sandbox {run.sandbox_id or 'local'}.",
                f"Tests: {inp.repo.test_command or 'no test command configured'}",
                "",
                "## Changes",
                f"{run.files_changed} files changed, +{run.lines_added} -{run.lines_removed}",
                "",
                "## Risk notes",
                "\n".join(risk) or "- none noted",
                "",
                "## Context warnings",
                warnings,
                *(["", "<details><summary>Suggested AGENTS.md</summary>", "", "```markdown", inp.suggested_agents_md, "```", "</details>"] if inp.suggested_agents_md else []),
                "",
                "## Links",
                f"- Temporal: {self.run_url(inp.task_id, inp.run_id)}",
                "",
                f"<sub>Conveyor task {inp.task_id}</sub>",
            ]
        )

    @activity.defn(name="publish_change")
    @host_errors
    async def publish_change(self, inp: PublishInput) -> ChangeRequest:
        if inp.run.patch is None:
            raise ValueError("publish_change called without a patch")
        patch = self.deps.store.get(inp.run.patch)
        validate_patch(patch, inp.repo.max_patch_bytes)  # again, on the side that applies it
        transcript = self.deps.store.get(inp.run.transcript).decode("utf-8", "replace") if inp.run.transcript else ""
        request = PublishRequest(
            task_id=inp.task_id,
            # Named after what the agent says it did (a command agent's text is a shell line);
            # slug() keeps only [a-z0-9-], and the task id keeps it unique and idempotent.
            branch=inp.follow_up_branch or branch_name(inp.task_id, headline(inp.run.summary) or inp.text),
            base=inp.base,
            base_sha=inp.base_sha,
            patch=patch,
            commit_message=self.commit_message(inp),
            title=f"conveyor: {one_line(inp.text)}",
            body=self.change_body(inp),
            requester=inp.requester,
            labels=["conveyor", *inp.repo.labels],
            reviewers=list(inp.repo.reviewers),
            transcript_text=transcript,
        )
        host = self.deps.codehost(inp.repo)
        return await asyncio.to_thread(host.publish, inp.repo, request)

    @activity.defn(name="check_change")
    @host_errors
    async def check_change(self, inp: ChecksInput) -> ChecksResult:
        host = self.deps.codehost(inp.repo)
        return await asyncio.to_thread(host.checks, inp.repo, inp.change)

    @activity.defn(name="merge_change")
    @host_errors
    async def merge_change(self, inp: MergeInput) -> MergeResult:
        message = "\n".join(
            [
                f"Merge {inp.change.branch} (Conveyor task {inp.task_id})",
                "",
                f"Approved-by: {inp.approved_by.principal}",
                f"Approved-head: {inp.approved_head}",
                f"Conveyor-Task: {inp.task_id}",
                "",
            ]
        )
        host = self.deps.codehost(inp.repo)
        return await asyncio.to_thread(host.merge, inp.repo, inp.change, inp.approved_head, message)

    @activity.defn(name="close_change")
    @host_errors
    async def close_change(self, inp: CloseInput) -> None:
        host = self.deps.codehost(inp.repo)
        await asyncio.to_thread(host.close, inp.repo, inp.change, inp.reason)

    @activity.defn(name="revert_change")
    @host_errors
    async def revert_change(self, inp: RevertInput) -> RevertResult:
        d = inp.decision
        original = inp.change.url if inp.change and inp.change.url else inp.merge_sha
        message = "\n".join(
            [
                f"Revert Conveyor task {inp.task_id}",
                "",
                f"This reverts merge {inp.merge_sha}.",
                f"Reverted-by: {d.by.principal} via {d.via}",
                f"Reason: {one_line(d.reason, 500) or 'not given'}",
                f"Original: {original}",
                f"Conveyor-Reverts: {inp.task_id}",
                "",
            ]
        )
        host = self.deps.codehost(inp.repo)
        return await asyncio.to_thread(host.revert, inp.repo, inp.base, inp.merge_sha, message, inp.task_id, d.emergency)
