"""Trusted-side git for the GitHub code host: one bare mirror per repository, fetched and pushed over
HTTPS with the token handed to git only through an ephemeral, URL-scoped `http.<url>.extraHeader`
in the process environment (GIT_CONFIG_COUNT/KEY/VALUE). The token is never written into
.git/config, a remote URL, argv (visible in /proc), a log line or an error message; checkouts made
for the sandbox are copies with no remote and no credential at all.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.codehost.base import CodeHostError
from adapters.patch import PatchRejected, check_applied_tree

# Config for every git command we run: no hooks, no fsmonitor, no pager, no prompts, no
# credential helpers from the worker's own ~/.gitconfig.
_SAFE_CONFIG = [
    ("core.hooksPath", os.devnull),
    ("core.fsmonitor", "false"),
    ("credential.helper", ""),
    ("protocol.file.allow", "always"),
    ("gc.auto", "0"),
]

_SANDBOX_GIT_CONFIG = """[core]
\trepositoryformatversion = 0
\tfilemode = true
\tbare = false
\tlogallrefupdates = false
"""


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class GitMirror:
    """A bare mirror of one remote repository under the workspaces directory."""

    def __init__(self, root: Path, clone_url: str, token_source: Callable[[], str], identity: tuple[str, str]):
        parsed = urllib.parse.urlsplit(clone_url)
        if parsed.scheme not in {"https", "http"} or parsed.username or parsed.password:
            raise CodeHostError(f"repository URL must be http(s) without credentials in it: {parsed.scheme}://{parsed.hostname}{parsed.path}", retryable=False)
        self.clone_url = clone_url
        self.url_scope = f"{parsed.scheme}://{parsed.netloc}/"
        key = hashlib.sha256(clone_url.encode()).hexdigest()[:12]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in parsed.path.strip("/"))
        self.path = root / f"{safe}-{key}"
        self._token_source = token_source
        self._bot_name, self._bot_email = identity

    # ---- environment ---------------------------------------------------------------------

    def _env(self, token: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        config = list(_SAFE_CONFIG)
        if token:
            basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
            config.append((f"http.{self.url_scope}.extraHeader", f"Authorization: Basic {basic}"))
        env["GIT_CONFIG_COUNT"] = str(len(config))
        for i, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{i}"] = key
            env[f"GIT_CONFIG_VALUE_{i}"] = value
        env.update(GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="/bin/false", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
                   GIT_AUTHOR_NAME=self._bot_name, GIT_AUTHOR_EMAIL=self._bot_email,
                   GIT_COMMITTER_NAME=self._bot_name, GIT_COMMITTER_EMAIL=self._bot_email)
        env.update(extra or {})
        return env

    def git(self, *args: str, cwd: Path | None = None, token: str | None = None, input: bytes | None = None,
            extra_env: dict[str, str] | None = None, check: bool = True, what: str = "",
            need: str = "") -> subprocess.CompletedProcess[bytes]:
        """Run git; on failure raise CodeHostError with stderr (redacted) and a retryable guess."""
        cmd = ["git", *args] if cwd is not None else ["git", "--git-dir", str(self.path), *args]
        proc = subprocess.run(cmd, cwd=cwd, input=input, capture_output=True, env=self._env(token, extra_env))
        if check and proc.returncode != 0:
            secrets = [token or ""]
            if token:
                secrets.append(base64.b64encode(f"x-access-token:{token}".encode()).decode())
            err = redact(proc.stderr.decode(errors="replace").strip(), secrets)[-2000:]
            lowered = err.lower()
            retryable = not any(s in lowered for s in ("authentication failed", "permission to", "denied",
                                                      "not found", "could not read username", "403", "401",
                                                      "does not apply", "patch failed", "corrupt patch"))
            verb = what or f"git {args[0]}"
            repo = f"{self.url_scope.rstrip('/')}{urllib.parse.urlsplit(self.clone_url).path}"
            hint = ""
            if need and any(s in lowered for s in ("401", "403", "authentication failed", "permission to", "denied")):
                hint = f" (the token or App installation needs {need} on this repository)"
            raise CodeHostError(f"{verb} failed for {repo}: {err}{hint}", retryable=retryable)
        return proc

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize fetch/push on one mirror across threads and worker processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _ensure(self) -> None:
        if not (self.path / "HEAD").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".init-", dir=self.path.parent))
            subprocess.run(["git", "init", "-q", "--bare", str(tmp)], check=True, capture_output=True, env=self._env())
            tmp.rename(self.path)

    # ---- operations ------------------------------------------------------------------------

    def has(self, sha: str) -> bool:
        if not (self.path / "HEAD").exists():
            return False
        return self.git("cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode == 0

    def fetch(self, *refspecs: str) -> None:
        """Fetch refspecs (branch names, `sha`s or full refspecs) into the mirror."""
        with self.locked():
            self._ensure()
            self.git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", self.clone_url, *refspecs,
                     token=self._token_source(), what="git fetch", need="Contents: read")

    def ensure_commit(self, sha: str, branch_hint: str | None = None) -> None:
        if self.has(sha):
            return
        specs = [f"+refs/heads/{branch_hint}:refs/heads/{branch_hint}"] if branch_hint else []
        try:
            self.fetch(*(specs or [sha]))
        except CodeHostError:
            if not specs:
                raise
        if not self.has(sha):
            self.fetch(sha)  # GitHub allows fetching any reachable commit by sha
        if not self.has(sha):
            raise CodeHostError(f"commit {sha} not found in {self.clone_url}", retryable=False)

    def push(self, sha: str, branch: str, expect: str | None) -> None:
        """Push `sha` to `branch`; `expect` is the remote value we saw ('' = must not exist)."""
        lease = f"--force-with-lease=refs/heads/{branch}:{expect or ''}"
        with self.locked():
            self.git("push", "--quiet", "--no-verify", lease, self.clone_url, f"{sha}:refs/heads/{branch}",
                     token=self._token_source(), what=f"git push to {branch}", need="Contents: write")

    def rev(self, expr: str) -> str | None:
        proc = self.git("rev-parse", "--verify", "-q", expr, check=False)
        return proc.stdout.decode().strip() or None

    def commit_patch(self, base_sha: str, patch: bytes, message: str) -> tuple[str, str]:
        """Apply `patch` on `base_sha` in a private index (no worktree, no hooks) and commit.
        Returns (commit sha, tree sha)."""
        with tempfile.TemporaryDirectory(prefix="conveyor-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.git("read-tree", base_sha, extra_env=env)
            if patch.strip():
                self.git("apply", "--cached", "--binary", "--whitespace=nowarn", "-", input=patch, extra_env=env,
                         what="applying the patch")
            tree = self.git("write-tree", extra_env=env).stdout.decode().strip()
        try:  # what the patch produced, not just what its text shows (renamed symlinks, gitlinks)
            check_applied_tree(self.path, base_sha, tree)
        except PatchRejected as exc:
            raise CodeHostError(f"patch refused: {exc}", retryable=False) from None
        sha = self.git("commit-tree", tree, "-p", base_sha, "-F", "-", input=message.encode()).stdout.decode().strip()
        return sha, tree

    def numstat(self, parent: str, sha: str) -> tuple[int, int, int]:
        out = self.git("diff", "--numstat", parent, sha).stdout.decode().splitlines()
        added = removed = 0
        for line in out:
            a, r, _ = line.split("\t", 2)
            added += int(a) if a.isdigit() else 0
            removed += int(r) if r.isdigit() else 0
        return len(out), added, removed

    def replay(self, onto: str, old: str, new: str) -> str | None:
        """The tree of `onto` with the change `old`..`new` applied (3-way where needed), in a private
        index; None when it conflicts."""
        diff = self.git("diff", "--binary", "--no-renames", old, new).stdout
        if not diff.strip():
            return self.rev(f"{onto}^{{tree}}")
        with tempfile.TemporaryDirectory(prefix="conveyor-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.git("read-tree", onto, extra_env=env)
            if self.git("apply", "--cached", "--3way", "--binary", "-", input=diff, extra_env=env,
                        check=False).returncode != 0:
                return None
            proc = self.git("write-tree", extra_env=env, check=False)
            return proc.stdout.decode().strip() if proc.returncode == 0 else None

    def revert_commit(self, onto: str, merge_sha: str, before: str, message: str) -> str:
        """A commit on `onto` undoing the change `before`..`merge_sha` (no worktree, no hooks)."""
        tree = self.replay(onto, merge_sha, before)
        if tree is None:
            raise CodeHostError(f"the revert of {merge_sha[:12]} conflicts with later changes on the base; revert it by hand",
                                retryable=False)
        return self.git("commit-tree", tree, "-p", onto, "-F", "-", input=message.encode()).stdout.decode().strip()

    def checkout(self, sha: str, dest: Path) -> None:
        """Make `dest` a standalone git working tree at `sha` with no remote and no credential.

        A warm `dest` (left by an earlier task) is reused so that only changed files are rewritten,
        but nothing in its .git is trusted: an untrusted run could have planted hooks, config
        (core.fsmonitor...), a forged index or poisoned loose objects. So .git is replaced by a
        fresh copy of the trusted mirror (objects copied, never hardlinked or shared through
        alternates), the index is rebuilt from the trusted tree and refreshed by hashing the
        files (reads, not writes), and only files that differ are written."""
        dest = Path(dest).resolve()
        gitdir = dest / ".git"
        warm = gitdir.exists() or gitdir.is_symlink()
        if gitdir.is_symlink() or gitdir.is_file():
            gitdir.unlink()
        elif gitdir.is_dir():
            shutil.rmtree(gitdir)
        if not warm and dest.exists() and any(dest.iterdir()):
            raise CodeHostError(f"checkout destination {dest} exists, is not empty and is not a git tree", retryable=False)
        dest.mkdir(parents=True, exist_ok=True)
        self.git("clone", "--quiet", "--bare", "--local", "--no-hardlinks", str(self.path), str(gitdir), cwd=dest,
                 what="copying the repository into the checkout")
        (gitdir / "config").write_text(_SANDBOX_GIT_CONFIG)
        for junk in ("hooks", "packed-refs", "refs", "FETCH_HEAD", "description"):
            target = gitdir / junk
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for sub in ("refs/heads", "refs/tags"):
            (gitdir / sub).mkdir(parents=True)
        if not self.has(sha):
            raise CodeHostError(f"commit {sha} is not in the mirror of {self.clone_url}", retryable=False)
        (gitdir / "HEAD").write_text(sha + "\n")
        self.git("read-tree", sha, cwd=dest)
        if warm:
            self.git("update-index", "-q", "--refresh", cwd=dest, check=False)  # exit 1 = some files differ
        self.git("reset", "--quiet", "--hard", sha, cwd=dest, what="git checkout")
        self.git("clean", "-qffdx", cwd=dest)
