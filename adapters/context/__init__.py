"""Startup context: the repo's AGENTS.md plus dynamic context, rendered under a size budget.

(Minimal version; the full builder with rot checks and Linear lands with the context work.)
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from adapters.codehost.base import CodeHost
from conveyor.config import RepoPolicy
from conveyor.models import Origin


class ContextDocument(BaseModel):
    text: str
    warnings: list[str] = Field(default_factory=list)
    cut: list[str] = Field(default_factory=list)


def build_context(
    codehost: CodeHost, repo: RepoPolicy, base_sha: str, text: str, origin: Origin, linear=None, budget_chars: int = 48_000
) -> ContextDocument:
    parts = [f"# Task\n\n{text}\n"]
    warnings = []
    agents_md = codehost.read_file(repo, base_sha, "AGENTS.md")
    if agents_md is None:
        warnings.append("the repository has no AGENTS.md")
    else:
        parts.append("# AGENTS.md\n\n" + agents_md.decode("utf-8", "replace"))
    commits = codehost.recent_commits(repo, base_sha, 10)
    parts.append("# Recent commits\n\n" + "\n".join(f"- {c.sha[:10]} {c.subject}" for c in commits))
    return ContextDocument(text="\n".join(parts)[:budget_chars], warnings=warnings)
