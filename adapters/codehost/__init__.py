"""Code hosts: `local` (git on disk) and `github` (PyGithub), chosen by the repo's policy."""

from __future__ import annotations

from adapters.codehost.base import CodeHost, CodeHostError
from conveyor.config import RepoPolicy, Settings


def get_codehost(repo: RepoPolicy, settings: Settings) -> CodeHost:
    if repo.host == "github":
        from adapters.codehost.github import GitHubCodeHost

        return GitHubCodeHost(settings)
    from adapters.codehost.local_git import LocalGitCodeHost

    return LocalGitCodeHost(settings)


__all__ = ["CodeHost", "CodeHostError", "get_codehost"]
