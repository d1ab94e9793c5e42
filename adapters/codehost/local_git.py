"""CodeHost `local`: a git repository on disk (bare or working) is the code host.

A change request is a branch plus a JSON record under CONVEYOR_HOME/changes. Commits, merges and
reverts are built with plumbing (temporary index, merge-tree, commit-tree) and land with a
compare-and-swap `update-ref`, so no working tree is written and a concurrent push is never
overwritten. Hooks never run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from adapters.codehost.base import CodeHostError, CommitInfo, PublishRequest
from adapters.git import GitError, git_dir_of, git_text, merge_tree, run_git
from adapters.patch import PatchRejected, check_applied_tree
from conveyor.config import RepoPolicy, Settings
from conveyor.models import ChangeRequest, ChecksResult, MergeResult, RevertResult

ZERO = "0" * 40


def has_line(message: str, line: str) -> bool:
    """`line` is a whole line of `message` (trailers are matched exactly, never as substrings)."""
    return line in message.splitlines()


class LocalGitCodeHost:
    name = "local"

    def __init__(self, settings: Settings):
        self.settings = settings

    # ---- paths -------------------------------------------------------------------------

    def _origin(self, repo: RepoPolicy) -> Path:
        path = Path(repo.url.removeprefix("file://")).expanduser()
        if not path.exists():
            raise CodeHostError(f"repository {repo.name}: {path} does not exist", retryable=False)
        return path

    def _gd(self, repo: RepoPolicy) -> Path:
        try:
            return git_dir_of(self._origin(repo))
        except GitError as exc:
            raise CodeHostError(f"repository {repo.name}: {exc.stderr}", retryable=False) from None

    def _records(self, repo: RepoPolicy) -> Path:
        key = hashlib.sha256(str(self._origin(repo).resolve()).encode()).hexdigest()[:16]
        path = self.settings.home / "changes" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def _locked(self, repo: RepoPolicy):
        with open(self._records(repo) / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _rev(self, gd: Path, ref: str) -> str | None:
        out = run_git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", git_dir=gd, check=False)
        return out.decode().strip() or None

    # ---- reads -------------------------------------------------------------------------

    def resolve_base(self, repo: RepoPolicy, base: str) -> str:
        sha = self._rev(self._gd(repo), f"refs/heads/{base}")
        if sha is None:
            raise CodeHostError(f"repository {repo.name} has no branch {base!r}", retryable=False)
        return sha

    def read_file(self, repo: RepoPolicy, sha: str, path: str) -> bytes | None:
        try:
            return run_git("cat-file", "blob", f"{sha}:{path}", git_dir=self._gd(repo))
        except GitError:
            return None

    def list_paths(self, repo: RepoPolicy, sha: str) -> list[str]:
        out = git_text("ls-tree", "-r", "--name-only", "-z", sha, git_dir=self._gd(repo))
        return [p for p in out.split("\0") if p]

    def recent_commits(self, repo: RepoPolicy, sha: str, limit: int) -> list[CommitInfo]:
        out = run_git(
            "log", f"-n{limit}", "--no-renames", "--name-only", "--format=%x1e%H%x1f%s%x1f%an%x1f%cI", sha,
            git_dir=self._gd(repo),
        ).decode("utf-8", "replace")  # fmt: skip
        commits = []
        for block in out.split("\x1e")[1:]:
            head, _, files = block.partition("\n")
            sha_, subject, author, date = (head.split("\x1f") + ["", "", "", ""])[:4]
            commits.append(CommitInfo(sha=sha_, subject=subject, author=author, date=date, paths=[f for f in files.split("\n") if f]))
        return commits

    def base_ci_status(self, repo: RepoPolicy, sha: str) -> str:
        return "unknown (the local code host runs no CI)"

    def checks(self, repo: RepoPolicy, change: ChangeRequest) -> ChecksResult:
        return ChecksResult(state="green", detail="the local code host has no required checks")

    # ---- workspaces --------------------------------------------------------------------

    def checkout(self, repo: RepoPolicy, sha: str, dest: Path) -> None:
        """Make `dest` a working tree at `sha`. A warm `dest` keeps its files (only changed ones are
        rewritten) but always gets a fresh `.git`: the previous run's agent could write there."""
        gd = self._gd(repo)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest / ".git", ignore_errors=True)
        if (dest / ".git").exists() or (dest / ".git").is_symlink():
            (dest / ".git").unlink()
        run_git("init", "-q", "--template=", str(dest))  # no sample hooks to copy
        (dest / ".git" / "hooks").mkdir(exist_ok=True)  # the sandbox mounts it read-only
        # Fetch just what the agent needs (recent history) by sha, from the trusted origin.
        upload_pack = "git -c uploadpack.allowAnySHA1InWant=true upload-pack"
        run_git("fetch", "-q", "--no-tags", "--depth=50", f"--upload-pack={upload_pack}", f"file://{gd}", sha, cwd=dest)
        run_git("read-tree", sha, cwd=dest)
        run_git("update-index", "-q", "--refresh", cwd=dest, check=False)
        run_git("checkout", "-q", "-f", "--detach", sha, cwd=dest)
        run_git("clean", "-q", "-ffdx", cwd=dest)

    # ---- change requests ---------------------------------------------------------------

    def _record_path(self, repo: RepoPolicy, task_id: str) -> Path:
        return self._records(repo) / f"{task_id}.json"

    def _load(self, repo: RepoPolicy, task_id: str) -> dict | None:
        path = self._record_path(repo, task_id)
        return json.loads(path.read_text()) if path.exists() else None

    def _save(self, repo: RepoPolicy, task_id: str, record: dict) -> None:
        path = self._record_path(repo, task_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, path)

    def _records_of(self, repo: RepoPolicy, branch: str) -> list[tuple[str, dict]]:
        """(task id, record) of the change requests on `branch` (a follow-up shares its branch)."""
        found = []
        for path in sorted(self._records(repo).glob("*.json")):
            record = json.loads(path.read_text())
            if record["branch"] == branch:
                found.append((path.stem, record))
        return found

    def _change(self, repo: RepoPolicy, record: dict) -> ChangeRequest:
        return ChangeRequest(
            number=record["number"],
            branch=record["branch"],
            head_sha=record["head"],
            base=record["base"],
            url=f"file://{self._origin(repo)}#{record['branch']}",
            files_changed=record.get("files_changed", 0),
            lines_added=record.get("lines_added", 0),
            lines_removed=record.get("lines_removed", 0),
        )

    def publish(self, repo: RepoPolicy, request: PublishRequest) -> ChangeRequest:
        gd = self._gd(repo)
        ref = f"refs/heads/{request.branch}"
        with self._locked(repo):
            head = self._rev(gd, ref)
            record = self._load(repo, request.task_id)
            if head is not None and record is not None and record["head"] == head:
                return self._change(repo, record)  # a retried publish finds its own change
            if head is None:
                head = self._commit_patch(gd, request, parent=request.base_sha)
                try:
                    run_git("update-ref", ref, head, ZERO, git_dir=gd)  # create-only
                except GitError:
                    head = self._rev(gd, ref) or head
            elif not has_line(git_text("log", "-1", "--format=%B", head, git_dir=gd), f"Conveyor-Task: {request.task_id}"):
                # A follow-up task on an existing change: its patch was made on the branch head.
                new = self._commit_patch(gd, request, parent=head)
                try:
                    run_git("update-ref", ref, new, head, git_dir=gd)
                except GitError:
                    raise CodeHostError(f"branch {request.branch} moved while publishing; retrying") from None
                head = new
            numstat = git_text("diff", "--numstat", request.base_sha, head, git_dir=gd).splitlines()
            added = sum(int(p.split("\t")[0]) for p in numstat if p.split("\t")[0].isdigit())
            removed = sum(int(p.split("\t")[1]) for p in numstat if p.split("\t")[1].isdigit())
            record = record or {"number": len(list(self._records(repo).glob("*.json"))) + 1}
            record.update(
                branch=request.branch,
                head=head,
                base=request.base,
                title=request.title,
                body=request.body,
                state="open",
                files_changed=len(numstat),
                lines_added=added,
                lines_removed=removed,
                labels=request.labels,
            )
            self._save(repo, request.task_id, record)
            return self._change(repo, record)

    def _commit_patch(self, gd: Path, request: PublishRequest, parent: str) -> str:
        with tempfile.TemporaryDirectory(prefix="conveyor-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            run_git("read-tree", parent, git_dir=gd, env=env)
            try:
                run_git("apply", "--cached", "--whitespace=nowarn", "-", git_dir=gd, env=env, input=request.patch)
            except GitError as exc:
                raise CodeHostError(f"the patch does not apply to {parent[:12]}: {exc.stderr.strip()[:300]}", retryable=False) from None
            tree = git_text("write-tree", git_dir=gd, env=env)
        try:
            check_applied_tree(gd, parent, tree)
        except PatchRejected as exc:
            raise CodeHostError(f"patch refused: {exc}", retryable=False) from None
        return git_text("commit-tree", tree, "-p", parent, git_dir=gd, input=request.commit_message.encode())

    def close(self, repo: RepoPolicy, change: ChangeRequest, reason: str) -> None:
        with self._locked(repo):
            for task_id, record in self._records_of(repo, change.branch):
                if record.get("state") == "open":
                    record.update(state="closed", closed_reason=reason)
                    self._save(repo, task_id, record)

    def comment(self, repo: RepoPolicy, change: ChangeRequest, text: str) -> None:
        with self._locked(repo):
            for task_id, record in self._records_of(repo, change.branch):
                record.setdefault("comments", []).append(text[:65536])
                self._save(repo, task_id, record)

    # ---- merge and revert --------------------------------------------------------------

    def _find(self, gd: Path, base: str, grep: str, merges: bool) -> str | None:
        """The newest commit on `base` with `grep` as a whole line of its message. A substring
        match would let quoted task text or an agent summary ("    Conveyor-Reverts: cv-...")
        in any commit pass for our own trailer and turn a revert or merge into a no-op."""
        args = ["log", "-n50", "--format=%H%x00%B%x1e", "-F", f"--grep={grep}", f"refs/heads/{base}"]
        if merges:
            args.insert(1, "--merges")
        for entry in git_text(*args, git_dir=gd).split("\x1e"):
            sha, _, body = entry.strip("\n").partition("\0")
            if sha and has_line(body, grep):
                return sha
        return None

    def _advance(self, repo: RepoPolicy, gd: Path, base: str, new: str, old: str) -> None:
        """Move `base` from old to new. If it is checked out in a working repository, update that
        working tree too (fast-forward), refusing when it has uncommitted changes."""
        origin = self._origin(repo)
        checked_out = git_dir_of(origin) != origin and git_text("symbolic-ref", "-q", "HEAD", git_dir=gd, check=False) == f"refs/heads/{base}"
        try:
            if checked_out:
                if git_text("status", "--porcelain", "--untracked-files=no", cwd=origin):
                    raise CodeHostError(
                        f"{origin} has uncommitted changes on {base}; commit or stash them so the merge can land", retryable=False
                    )
                run_git("merge", "-q", "--ff-only", new, cwd=origin)
            else:
                run_git("update-ref", f"refs/heads/{base}", new, old, git_dir=gd)
        except GitError as exc:
            if checked_out and "would be overwritten" in exc.stderr:
                # untracked files in the working tree are in the way: retrying cannot help
                raise CodeHostError(
                    f"{origin}: files in the working tree are in the way of the merge ({exc.stderr.strip()[:300]})", retryable=False
                ) from None
            raise CodeHostError(f"{base} moved while landing; retrying ({exc.stderr.strip()[:200]})") from None

    def merge(self, repo: RepoPolicy, change: ChangeRequest, approved_head: str, message: str) -> MergeResult:
        gd = self._gd(repo)
        with self._locked(repo):
            task_trailer = next((ln for ln in message.splitlines() if ln.startswith("Conveyor-Task: ")), None)
            if task_trailer and (done := self._find(gd, change.base, task_trailer, merges=True)):
                return MergeResult(outcome="merged", merge_sha=done, detail="already merged")
            head = self._rev(gd, f"refs/heads/{change.branch}")
            if head != approved_head:
                return MergeResult(outcome="head_moved", detail=f"branch head is {str(head)[:12]}, approved {approved_head[:12]}")
            base_now = self.resolve_base(repo, change.base)
            tree = merge_tree(gd, base_now, approved_head)
            if tree is None:
                return MergeResult(outcome="needs_rebase", detail=f"{change.base} moved and the change no longer merges cleanly")
            merge = git_text("commit-tree", tree, "-p", base_now, "-p", approved_head, git_dir=gd, input=message.encode())
            self._advance(repo, gd, change.base, merge, base_now)
            for task_id, record in self._records_of(repo, change.branch):
                record.update(state="merged", merge=merge)
                self._save(repo, task_id, record)
            return MergeResult(outcome="merged", merge_sha=merge)

    def revert(self, repo: RepoPolicy, base: str, merge_sha: str, message: str, task_id: str, emergency: bool) -> RevertResult:
        gd = self._gd(repo)
        with self._locked(repo):
            if done := self._find(gd, base, f"Conveyor-Reverts: {task_id}", merges=False):
                return RevertResult(revert_sha=done, url=f"file://{self._origin(repo)}#{done}", already=True)
            base_now = self.resolve_base(repo, base)
            parents = git_text("rev-list", "--parents", "-n1", merge_sha, git_dir=gd).split()[1:]
            if not parents:
                raise CodeHostError(f"{merge_sha[:12]} has no parent to revert to", retryable=False)
            # The inverse of the merge (merge -> its first parent), applied to today's base.
            inverse = run_git("diff", "--binary", merge_sha, parents[0], git_dir=gd)
            with tempfile.TemporaryDirectory(prefix="conveyor-index-") as tmp:
                env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
                run_git("read-tree", base_now, git_dir=gd, env=env)
                try:
                    run_git("apply", "--cached", "--3way", "-", git_dir=gd, env=env, input=inverse)
                except GitError:
                    raise CodeHostError(f"reverting {merge_sha[:12]} conflicts with later changes on {base}", retryable=False) from None
                tree = git_text("write-tree", git_dir=gd, env=env)
            sha = git_text("commit-tree", tree, "-p", base_now, git_dir=gd, input=message.encode())
            self._advance(repo, gd, base, sha, base_now)
            return RevertResult(revert_sha=sha, url=f"file://{self._origin(repo)}#{sha}")
