"""What every activity shares: settings, the artifact store, adapters chosen by the repo policy,
and the translation of adapter errors into Temporal's retry semantics."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio.exceptions import ApplicationError

from adapters.artifacts import ArtifactStore
from adapters.codehost import CodeHost, CodeHostError, get_codehost
from adapters.git import GitError
from adapters.patch import PatchRejected
from conveyor.config import RepoPolicy, Settings

T = TypeVar("T")


class Deps:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = ArtifactStore(settings.artifacts_dir)

    def codehost(self, repo: RepoPolicy) -> CodeHost:
        return get_codehost(repo, self.settings)

    def repo_key(self, repo: RepoPolicy) -> str:
        return f"{repo.name}-{hashlib.sha256(repo.url.encode()).hexdigest()[:8]}"


def host_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Non-retryable adapter errors become non-retryable ApplicationErrors with the same message;
    everything else is retried by the activity's retry policy."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except CodeHostError as exc:
            raise ApplicationError(str(exc), type="CodeHostError", non_retryable=not exc.retryable) from None
        except PatchRejected as exc:
            raise ApplicationError(f"patch refused: {exc}", type="PatchRejected", non_retryable=True) from None
        except GitError as exc:
            raise ApplicationError(str(exc), type="GitError") from None

    return wrapper
