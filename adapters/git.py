"""Running git on the trusted side: hooks off, no user/system config, explicit identity.

Every trusted git call goes through `run_git`, so nothing a repository contains (hooks,
fsmonitor, replace refs) can execute code or change what we read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SAFE_CONFIG = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.untrackedCache=false",
    "-c", "protocol.file.allow=always",
    "-c", "init.defaultBranch=main",
    "-c", "advice.detachedHead=false",
    "-c", "gc.auto=0",
)  # fmt: skip


class GitError(Exception):
    def __init__(self, args: list[str], returncode: int, stderr: str):
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"git {' '.join(args[:3])} failed ({returncode}): {stderr.strip()[:500]}")


def git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_AUTHOR_NAME": "Conveyor",
        "GIT_AUTHOR_EMAIL": "conveyor@localhost",
        "GIT_COMMITTER_NAME": "Conveyor",
        "GIT_COMMITTER_EMAIL": "conveyor@localhost",
    }
    if extra:
        env.update(extra)
    return env


def run_git(
    *args: str,
    cwd: Path | str | None = None,
    git_dir: Path | str | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> bytes:
    if shutil.which("git") is None:
        raise GitError(list(args), 127, "git is not installed")
    argv = ["git", *SAFE_CONFIG]
    if git_dir is not None:
        argv += ["--git-dir", str(git_dir)]
    argv += list(args)
    proc = subprocess.run(argv, cwd=cwd, input=input, capture_output=True, env=git_env(env))
    if check and proc.returncode != 0:
        raise GitError(list(args), proc.returncode, proc.stderr.decode("utf-8", "replace"))
    return proc.stdout


def git_text(*args: str, **kwargs) -> str:
    return run_git(*args, **kwargs).decode("utf-8", "replace").strip()


def git_dir_of(path: Path) -> Path:
    """The git directory of a bare or working repository at `path`."""
    if (path / ".git").is_dir():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return path
    raise GitError(["rev-parse"], 128, f"{path} is not a git repository")


def merge_tree(git_dir: Path, ours: str, theirs: str) -> str | None:
    """Three-way merge without a working tree: the merged tree id, or None on conflict."""
    args = ["merge-tree", "--write-tree", "--no-messages"]
    argv = ["git", *SAFE_CONFIG, "--git-dir", str(git_dir), *args, ours, theirs]
    proc = subprocess.run(argv, capture_output=True, env=git_env())
    if proc.returncode == 1:
        return None
    if proc.returncode != 0:
        raise GitError(args, proc.returncode, proc.stderr.decode("utf-8", "replace"))
    return proc.stdout.decode().split("\n", 1)[0].strip()
