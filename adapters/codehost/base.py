"""The CodeHost protocol: where repositories, change requests, merges and reverts live.

Implementations: local git (bare repositories on disk) and GitHub (PyGithub).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

from conveyor.config import RepoPolicy
from conveyor.models import ChangeRequest, ChecksResult, Identity, MergeResult, RevertResult


class CodeHostError(Exception):
    """A code-host failure. `retryable` says whether the activity retry policy should try again."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


class CommitInfo(BaseModel):
    sha: str
    subject: str
    author: str
    date: str
    paths: list[str] = Field(default_factory=list)


class PublishRequest(BaseModel):
    """A validated patch, committed by the trusted side and opened for review."""

    task_id: str
    branch: str
    base: str
    base_sha: str
    patch: bytes
    commit_message: str
    title: str
    body: str
    requester: Identity
    labels: list[str] = Field(default_factory=list)
    reviewers: list[str] = Field(default_factory=list)
    transcript_text: str = ""


class CodeHost(Protocol):
    name: str

    def resolve_base(self, repo: RepoPolicy, base: str) -> str:
        """The commit sha the base branch points at now."""
        ...

    def checkout(self, repo: RepoPolicy, sha: str, dest: Path) -> None:
        """Make `dest` a git working tree at `sha`, without credentials in it (warm reuse allowed)."""
        ...

    def read_file(self, repo: RepoPolicy, sha: str, path: str) -> bytes | None: ...

    def recent_commits(self, repo: RepoPolicy, sha: str, limit: int) -> list[CommitInfo]: ...

    def list_paths(self, repo: RepoPolicy, sha: str) -> list[str]:
        """Every file path in the tree at `sha` (recursive, files only, repo-relative), for the
        AGENTS.md rot checks. Local git: `git ls-tree -r -z --name-only SHA`."""
        ...

    def base_ci_status(self, repo: RepoPolicy, sha: str) -> str:
        """Human summary of the base commit's CI ('green', 'failing: a, b', 'unknown')."""
        ...

    def publish(self, repo: RepoPolicy, request: PublishRequest) -> ChangeRequest:
        """Commit the patch on `branch` and open a change request. Idempotent by branch name."""
        ...

    def checks(self, repo: RepoPolicy, change: ChangeRequest) -> ChecksResult: ...

    def merge(self, repo: RepoPolicy, change: ChangeRequest, approved_head: str, message: str) -> MergeResult:
        """Merge exactly `approved_head`; rebase when the base moved and the rebase is clean."""
        ...

    def close(self, repo: RepoPolicy, change: ChangeRequest, reason: str) -> None: ...

    def revert(
        self, repo: RepoPolicy, base: str, merge_sha: str, message: str, task_id: str, emergency: bool
    ) -> RevertResult:
        """Land (or open) a revert of `merge_sha` on `base`. Idempotent by task id."""
        ...

    def comment(self, repo: RepoPolicy, change: ChangeRequest, text: str) -> None: ...
