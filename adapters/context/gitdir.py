"""Read-only context gathering straight from a local git directory (bare or working).

A standalone helper for the parts of the CodeHost protocol the context builder uses
(`read_file`, `recent_commits`, `list_paths`, `base_ci_status`). The local code host can
delegate to it; tests and the benchmark use it on their own fixtures.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from adapters.codehost.base import CodeHostError, CommitInfo
from conveyor.config import RepoPolicy

# Unit/record separators: cannot appear in subjects or author names, so parsing is unambiguous.
_RS = "\x1e"
_US = "\x1f"


def _git(git_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {"GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "LC_ALL": "C", "PATH": "/usr/local/bin:/usr/bin:/bin"}
    proc = subprocess.run(["git", "-C", str(git_dir), *args], capture_output=True, env=env)
    if check and proc.returncode != 0:
        raise CodeHostError(
            f"git {' '.join(args[:2])} failed in {git_dir}: {proc.stderr.decode(errors='replace').strip()}",
            retryable=False,
        )
    return proc


class GitDirSource:
    """Context source over one local repository path (the RepoPolicy's url when it is local)."""

    name = "gitdir"

    def __init__(self, path: str | Path | None = None):
        self._path = Path(path) if path is not None else None

    def _dir(self, repo: RepoPolicy) -> Path:
        path = self._path or Path(repo.url)
        if not path.exists():
            raise CodeHostError(f"repository path {path} does not exist", retryable=False)
        return path

    def resolve_base(self, repo: RepoPolicy, base: str) -> str:
        proc = _git(self._dir(repo), "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}", check=False)
        if proc.returncode != 0:
            raise CodeHostError(f"base {base!r} does not name a commit in {repo.name}", retryable=False)
        return proc.stdout.decode().strip()

    def read_file(self, repo: RepoPolicy, sha: str, path: str) -> bytes | None:
        proc = _git(self._dir(repo), "cat-file", "blob", f"{sha}:{path}", check=False)
        return proc.stdout if proc.returncode == 0 else None

    def list_paths(self, repo: RepoPolicy, sha: str) -> list[str]:
        proc = _git(self._dir(repo), "ls-tree", "-r", "-z", "--name-only", sha)
        return [p for p in proc.stdout.decode("utf-8", errors="replace").split("\0") if p]

    def recent_commits(self, repo: RepoPolicy, sha: str, limit: int) -> list[CommitInfo]:
        if limit <= 0:
            return []
        fmt = f"{_RS}%H{_US}%s{_US}%an{_US}%cI"
        # --no-renames: paths as touched; first-parent keeps merges readable and the walk short.
        proc = _git(
            self._dir(repo), "log", "-z", "--first-parent", "--no-renames", "--name-only",
            f"--format={fmt}", f"-n{limit}", sha, "--",
        )
        commits: list[CommitInfo] = []
        for record in proc.stdout.decode("utf-8", errors="replace").split(_RS):
            if not record.strip("\0\n"):
                continue
            head, _, rest = record.partition("\0")
            fields = head.split(_US)
            if len(fields) != 4:
                continue
            # With -z, the header ends with NUL only when paths follow; strip separators around paths.
            paths = [p.strip("\n") for p in rest.split("\0") if p.strip("\n")]
            commits.append(CommitInfo(sha=fields[0].strip("\n"), subject=fields[1], author=fields[2], date=fields[3], paths=paths))
        return commits

    def base_ci_status(self, repo: RepoPolicy, sha: str) -> str:
        return "unknown (local repository: no CI)"
