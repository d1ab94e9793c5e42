"""Startup context: what an agent reads before it starts.

From the base commit: the repository's own instructions (AGENTS.md, else CLAUDE.md, else
.github/copilot-instructions.md), plus dynamic context (recent commits with the paths they
touched, the base branch's CI status, open agent-tagged Linear issues, the triggering
conversation) and the task itself, rendered as one markdown document under a size budget.
The least important parts are cut first and every cut is reported. The same inputs always
give the same document (nothing here reads the clock).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, Field

from adapters.codehost.base import CodeHost, CommitInfo
from adapters.context import rot
from conveyor.config import RepoPolicy
from conveyor.models import Origin

INSTRUCTION_FILES = ("AGENTS.md", "CLAUDE.md", ".github/copilot-instructions.md")
SHOWN_COMMITS = 30
"""Commits rendered into the document (before any cut)."""
SCANNED_COMMITS = 400
"""Commits scanned for the staleness check (one `git log`, cheap even on large histories)."""
MAX_PATHS_PER_COMMIT = 8
MAX_INSTRUCTIONS_CHARS = 64_000
"""Instruction files larger than this are not read whole (they would crowd out the task)."""


class ContextDocument(BaseModel):
    text: str
    warnings: list[str] = Field(default_factory=list)
    """Rot and gathering problems, for the PR body and the Slack summary."""
    cut: list[str] = Field(default_factory=list)
    """What the size budget removed, least important first."""
    instructions_file: str = ""
    """Which instructions file was used ('' when the repository has none)."""
    suggested_agents_md: str = ""
    """A starting AGENTS.md when the repository has none."""


class LinearIssues(Protocol):
    def agent_issues(self, team: str | None = None, label: str | None = None) -> list[str]: ...


@dataclass
class _Section:
    """One document section. `priority`: lower is cut first; the task (None) is never cut."""

    title: str
    priority: int | None
    head: str = ""
    items: list[str] = field(default_factory=list)
    keep_first: bool = False
    """Conversation: the first message (the request itself) goes last."""
    drop_from_end: bool = True
    """Items are ordered most important first, so cutting drops from the end."""
    truncatable: bool = False
    dropped_items: int = 0
    original_items: int = 0
    truncated_from: int = 0
    gone: bool = False

    def render(self) -> str:
        if self.gone:
            return ""
        body = "\n".join(([self.head] if self.head else []) + self.items)
        return f"## {self.title}\n\n{body.rstrip()}\n\n"


def _short(sha: str) -> str:
    return sha[:10]


def _render_commit(commit: CommitInfo) -> str:
    paths = commit.paths[:MAX_PATHS_PER_COMMIT]
    more = len(commit.paths) - len(paths)
    touched = ", ".join(paths) + (f" (+{more} more)" if more > 0 else "")
    line = f"- {_short(commit.sha)} {commit.subject.strip()} ({commit.author}, {commit.date[:10]})"
    return f"{line}\n  touched: {touched}" if touched else line


def _decode(blob: bytes) -> str:
    return blob.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _safe(call: Callable[[], Any], what: str, warnings: list[str]) -> Any:
    """Optional context: a failure becomes a warning, not a failed task."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - any source failing must not block the task
        warnings.append(f"could not get {what}: {type(exc).__name__}: {exc}")
        return None


def _list_files(codehost: CodeHost, repo: RepoPolicy, base_sha: str) -> list[str] | None:
    # Optional protocol method: a code host without it just gets no path/staleness checks.
    lister = getattr(codehost, "list_paths", None)
    if lister is None:
        return None
    return list(lister(repo, base_sha))


def build_context(
    codehost: CodeHost,
    repo: RepoPolicy,
    base_sha: str,
    text: str,
    origin: Origin,
    linear: LinearIssues | None = None,
    budget_chars: int = 48_000,
    *,
    sandbox_path: str = rot.SANDBOX_PATH,
) -> ContextDocument:
    if budget_chars < 1000:
        raise ValueError(f"budget_chars={budget_chars} is too small for a useful context document (minimum 1000)")
    warnings: list[str] = []

    # --- the repository's own instructions -----------------------------------------------------
    instructions_file = ""
    instructions = ""
    for candidate in INSTRUCTION_FILES:
        blob = codehost.read_file(repo, base_sha, candidate)
        if blob is not None:
            instructions_file, instructions = candidate, _decode(blob)
            break
    if instructions_file and len(instructions) > MAX_INSTRUCTIONS_CHARS:
        warnings.append(
            f"{instructions_file} is {len(instructions)} characters; only the first {MAX_INSTRUCTIONS_CHARS} are used"
        )
        instructions = instructions[:MAX_INSTRUCTIONS_CHARS]
    if instructions_file and instructions_file != "AGENTS.md":
        warnings.append(f"no AGENTS.md at the base commit; using {instructions_file} instead")

    files = _safe(lambda: _list_files(codehost, repo, base_sha), "the file list of the base commit", warnings)
    tree = rot.Tree(files) if files is not None else None
    commits: list[CommitInfo] = (
        _safe(lambda: codehost.recent_commits(repo, base_sha, SCANNED_COMMITS), "recent commits", warnings) or []
    )

    suggested = ""
    notes: list[str] = []
    if not instructions_file:
        suggested = rot.suggest_skeleton(tree) if tree is not None else rot.suggest_skeleton(rot.Tree([]))
        warnings.append(
            "the repository has no AGENTS.md (nor CLAUDE.md or .github/copilot-instructions.md): agents start "
            "without its conventions; add one (a suggested skeleton comes with this warning)"
        )
    elif tree is not None:
        mentions = rot.extract_mentions(instructions)
        doc_dir = posixpath.dirname(instructions_file)
        if doc_dir == ".github":
            doc_dir = ""  # copilot instructions describe the repository root
        notes += rot.path_warnings(instructions_file, mentions, tree, doc_dir)
        notes += rot.command_warnings(instructions_file, mentions, tree, doc_dir, sandbox_path)
        stale = rot.staleness_warning(instructions_file, mentions, tree, commits)
        if stale:
            notes.append(stale)
    if repo.test_command:
        # The policy's own test command must be runnable in the sandbox image too.
        notes += rot.command_warnings(
            "the repository's test_command", rot.Mentions(commands=[repo.test_command]), tree or rot.Tree([]), "", sandbox_path
        )
    warnings += notes

    # --- dynamic context ---------------------------------------------------------------------
    ci = _safe(lambda: codehost.base_ci_status(repo, base_sha), "the base branch CI status", warnings) or "unknown"
    issues: list[str] = []
    if linear is not None:
        got = _safe(lambda: linear.agent_issues(team=repo.linear_team or None), "agent-tagged Linear issues", warnings)
        issues = sorted(str(i).strip() for i in (got or []) if str(i).strip())

    # --- sections, in reading order ----------------------------------------------------------
    sections: list[_Section] = [
        _Section("Task", None, head=text.strip()),
    ]
    if origin.conversation:
        label = {"slack": "Slack thread", "linear": "Linear issue", "github": "GitHub conversation"}.get(
            origin.source, "Conversation"
        )
        messages = [m.strip() for m in origin.conversation if m.strip()]
        head = f"Source: {label}" + (f" ({origin.url})" if origin.url else "")
        sections.append(
            _Section("Triggering conversation", 70, head=head, items=[f"> {_quote(m)}\n" for m in messages], keep_first=True)
        )
    if instructions_file:
        sections.append(_Section(f"Repository instructions ({instructions_file})", 90, head=instructions.strip(), truncatable=True))
    else:
        sections.append(_Section("Repository instructions", 90, head="The repository has no AGENTS.md."))
    if notes:
        sections.append(_Section("Notes on the instructions", 50, items=[f"- {n}" for n in notes]))
    sections.append(_Section("Base branch CI", 60, head=f"`{repo.base}` at {_short(base_sha)}: {ci}"))
    if commits:
        shown = commits[:SHOWN_COMMITS]
        sections.append(_Section("Recent commits (newest first)", 40, items=[_render_commit(c) for c in shown]))
    if issues:
        sections.append(_Section("Open agent-tagged Linear issues", 20, items=[f"- {i}" for i in issues]))
    for s in sections:
        s.original_items = len(s.items)

    title = f"# Startup context: {repo.name} at {_short(base_sha)}\n\n"
    cut = _fit(title, sections, budget_chars)
    document = title + "".join(s.render() for s in sections)
    if len(document) > budget_chars:
        warnings.append(
            f"the task alone is {len(document)} characters, over the {budget_chars}-character context budget"
        )
    return ContextDocument(
        text=document.rstrip() + "\n",
        warnings=warnings,
        cut=cut,
        instructions_file=instructions_file,
        suggested_agents_md=suggested,
    )


def _quote(message: str) -> str:
    return message.replace("\n", "\n> ")


def _fit(title: str, sections: list[_Section], budget: int) -> list[str]:
    """Cut least important content until the document fits; report each cut."""
    total = len(title) + sum(len(s.render()) for s in sections)
    for section in sorted((s for s in sections if s.priority is not None), key=lambda s: s.priority or 0):
        if total <= budget:
            break
        before = len(section.render())
        others = total - before
        if section.truncatable:
            # Truncate instructions keeping the beginning (where the essentials usually are).
            marker = "\n\n[... truncated to fit the context budget]"
            keep = len(section.head) - (total - budget) - len(marker)
            if keep >= 500:
                section.truncated_from = len(section.head)
                section.head = section.head[:keep].rstrip() + marker
            else:
                section.gone = True
        else:
            floor = 1 if section.keep_first else 0
            while others + len(section.render()) > budget and len(section.items) > floor:
                # Conversation: keep the first message (the request) and drop the oldest after it.
                section.items.pop(1 if section.keep_first else -1)
                section.dropped_items += 1
            if others + len(section.render()) > budget or (not section.items and not section.head):
                section.gone = True
        total = others + len(section.render())
    cut = []
    for section in sorted((s for s in sections if s.priority is not None), key=lambda s: s.priority or 0):
        if section.gone:
            count = f" ({section.original_items} items)" if section.original_items else ""
            cut.append(f"{section.title}: removed entirely{count}")
        elif section.truncated_from:
            cut.append(f"{section.title}: truncated from {section.truncated_from} to {len(section.head)} characters")
        elif section.dropped_items:
            which = "oldest" if section.title.startswith("Recent commits") else "older" if section.keep_first else "last"
            cut.append(f"{section.title}: dropped {section.dropped_items} {which} of {section.original_items} items")
    return cut
