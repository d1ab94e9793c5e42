"""LocalGitCodeHost on real repositories: a bare one and a working one with the base checked out."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from adapters.codehost.base import CodeHostError, PublishRequest
from adapters.codehost.local_git import LocalGitCodeHost
from adapters.git import git_text, run_git
from conveyor.config import RepoPolicy, Settings
from conveyor.models import Identity
from temporal.demo import FILES, make_repo

TASK = "cv-0123456789ab"
BRANCH = f"conveyor/{TASK}-raise-retries"


@pytest.fixture(params=["bare", "work"])
def origin(request, tmp_path) -> Path:
    bare = make_repo(tmp_path / "origin.git", FILES)
    if request.param == "bare":
        return bare
    work = tmp_path / "work"
    run_git("clone", "-q", str(bare), str(work))  # a working repository with main checked out
    run_git("remote", "remove", "origin", cwd=work)
    return work


@pytest.fixture
def host(tmp_path) -> LocalGitCodeHost:
    return LocalGitCodeHost(Settings(home=tmp_path / "home"))


@pytest.fixture
def repo(origin) -> RepoPolicy:
    return RepoPolicy(name="demo", url=str(origin))


def is_bare(origin: Path) -> bool:
    return not (origin / ".git").exists()


def g(origin: Path, *args: str) -> str:
    return git_text(*args, git_dir=origin if is_bare(origin) else origin / ".git")


def make_patch(origin: Path, sha: str, files: dict[str, str]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        run_git("clone", "-q", "--no-checkout", str(origin), tmp)
        run_git("checkout", "-q", "--detach", sha, cwd=tmp)
        for name, content in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(content)
        run_git("add", "-A", cwd=tmp)
        return run_git("diff", "--cached", "--binary", "HEAD", cwd=tmp)


def commit_on(origin: Path, branch: str, files: dict[str, str], message: str = "someone else") -> str:
    """Someone else moves `branch` in the origin (a push, or a commit in the working tree)."""
    if not is_bare(origin) and branch == g(origin, "branch", "--show-current"):
        for name, content in files.items():
            (origin / name).write_text(content)
        run_git("commit", "-q", "-am", message, cwd=origin)
        return g(origin, "rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        run_git("clone", "-q", "--branch", branch, str(origin), tmp)
        for name, content in files.items():
            (Path(tmp) / name).write_text(content)
        run_git("commit", "-q", "-am", message, cwd=tmp)
        run_git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=tmp)
        return git_text("rev-parse", "HEAD", cwd=tmp)


def publish_request(origin: Path, base_sha: str, files: dict[str, str], task_id: str = TASK, branch: str = BRANCH):
    return PublishRequest(
        task_id=task_id,
        branch=branch,
        base="main",
        base_sha=base_sha,
        patch=make_patch(origin, base_sha, files),
        commit_message=f"Raise retries\n\nConveyor-Task: {task_id}\n",
        title="Raise retries",
        body="",
        requester=Identity(kind="local", id="alice"),
    )


CHANGE = {"app/config.py": "# How many times an upload is retried before giving up.\nRETRIES = 3\n"}
MERGE_MSG = f"Merge {BRANCH}\n\nConveyor-Task: {TASK}\n"


def test_publish_is_idempotent(host, repo, origin, tmp_path):
    base = host.resolve_base(repo, "main")
    req = publish_request(origin, base, CHANGE)
    first = host.publish(repo, req)
    second = host.publish(repo, req)
    assert first == second
    assert first.head_sha == g(origin, "rev-parse", BRANCH)
    assert (first.files_changed, first.lines_added, first.lines_removed) == (1, 1, 1)
    assert g(origin, "for-each-ref", "--format=%(refname)", "refs/heads/conveyor/").splitlines() == [f"refs/heads/{BRANCH}"]
    records = list((tmp_path / "home" / "changes").rglob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["head"] == first.head_sha
    assert g(origin, "rev-list", "--parents", "-n1", first.head_sha).split()[1:] == [base]
    assert g(origin, "rev-parse", "main") == base  # publishing never touches base


def test_merge_after_base_moved_cleanly(host, repo, origin):
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(origin, base, CHANGE))
    moved = commit_on(origin, "main", {"README.md": "# upload-service\n\nMoved on.\n"})
    result = host.merge(repo, change, change.head_sha, MERGE_MSG)
    assert result.outcome == "merged"
    assert g(origin, "rev-parse", "main") == result.merge_sha
    assert g(origin, "rev-list", "--parents", "-n1", result.merge_sha).split()[1:] == [moved, change.head_sha]
    assert g(origin, "show", "main:app/config.py").endswith("RETRIES = 3")
    assert g(origin, "show", "main:README.md").endswith("Moved on.")
    again = host.merge(repo, change, change.head_sha, MERGE_MSG)  # a retried activity
    assert (again.outcome, again.merge_sha) == ("merged", result.merge_sha)
    if not is_bare(origin):  # the checked-out working tree followed the merge and is clean
        assert (origin / "app" / "config.py").read_text().endswith("RETRIES = 3\n")
        assert g(origin, "rev-parse", "HEAD") == result.merge_sha
        assert git_text("status", "--porcelain", cwd=origin) == ""


def test_conflicting_base_needs_rebase(host, repo, origin):
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(origin, base, CHANGE))
    moved = commit_on(origin, "main", {"app/config.py": "# How many times an upload is retried before giving up.\nRETRIES = 5\n"})
    result = host.merge(repo, change, change.head_sha, MERGE_MSG)
    assert result.outcome == "needs_rebase"
    assert g(origin, "rev-parse", "main") == moved
    assert g(origin, "show", "main:app/config.py").endswith("RETRIES = 5")


def test_head_moved_after_approval_merges_nothing(host, repo, origin):
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(origin, base, CHANGE))
    commit_on(origin, BRANCH, {"README.md": "sneaky\n"}, message="pushed after review")
    result = host.merge(repo, change, change.head_sha, MERGE_MSG)
    assert result.outcome == "head_moved"
    assert g(origin, "rev-parse", "main") == base
    assert "sneaky" not in g(origin, "show", "main:README.md")


def test_revert_restores_and_is_idempotent(host, repo, origin):
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(origin, base, CHANGE))
    merged = host.merge(repo, change, change.head_sha, MERGE_MSG).merge_sha
    later = commit_on(origin, "main", {"README.md": "# upload-service\n\nLater work.\n"})
    message = f"Revert\n\nThis reverts merge {merged}.\nConveyor-Reverts: {TASK}\n"
    first = host.revert(repo, "main", merged, message, TASK, emergency=True)
    assert not first.already
    assert g(origin, "rev-parse", "main") == first.revert_sha
    assert g(origin, "rev-list", "--parents", "-n1", first.revert_sha).split()[1:] == [later]
    assert g(origin, "show", "main:app/config.py").endswith("RETRIES = 1")
    assert g(origin, "show", "main:README.md").endswith("Later work.")  # later work kept
    second = host.revert(repo, "main", merged, message, TASK, emergency=True)
    assert second.already and second.revert_sha == first.revert_sha
    assert g(origin, "rev-parse", "main") == first.revert_sha
    if not is_bare(origin):
        assert (origin / "app" / "config.py").read_text().endswith("RETRIES = 1\n")


def test_revert_conflicting_with_later_changes_is_final(host, repo, origin):
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(origin, base, CHANGE))
    merged = host.merge(repo, change, change.head_sha, MERGE_MSG).merge_sha
    later = commit_on(origin, "main", {"app/config.py": "# tuned\nRETRIES = 7\n"})
    with pytest.raises(CodeHostError) as err:
        host.revert(repo, "main", merged, f"Revert\n\nConveyor-Reverts: {TASK}\n", TASK, emergency=True)
    assert not err.value.retryable and "conflicts with later changes" in str(err.value)
    assert g(origin, "rev-parse", "main") == later


def test_dirty_working_tree_is_refused(tmp_path):
    bare = make_repo(tmp_path / "origin.git", FILES)
    work = tmp_path / "work"
    run_git("clone", "-q", str(bare), str(work))
    host = LocalGitCodeHost(Settings(home=tmp_path / "home"))
    repo = RepoPolicy(name="demo", url=str(work))
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(work, base, CHANGE))
    (work / "README.md").write_text("local edits in progress\n")
    with pytest.raises(CodeHostError) as err:
        host.merge(repo, change, change.head_sha, MERGE_MSG)
    assert not err.value.retryable and "uncommitted changes" in str(err.value)
    assert git_text("rev-parse", "main", cwd=work) == base
    assert (work / "README.md").read_text() == "local edits in progress\n"  # the user's work is untouched


def test_missing_repository_is_a_final_error(host, tmp_path):
    with pytest.raises(CodeHostError) as err:
        host.resolve_base(RepoPolicy(name="gone", url=str(tmp_path / "nope")), "main")
    assert not err.value.retryable and "does not exist" in str(err.value)
    with pytest.raises(CodeHostError, match="no branch 'trunk'"):
        host.resolve_base(RepoPolicy(name="d", url=str(make_repo(tmp_path / "o.git", FILES))), "trunk")


def test_checkout_into_warm_dir_gets_a_fresh_git(host, repo, origin, tmp_path):
    base = host.resolve_base(repo, "main")
    dest = tmp_path / "ws"
    host.checkout(repo, base, dest)
    assert (dest / "app" / "config.py").read_text().endswith("RETRIES = 1\n")
    assert git_text("rev-parse", "HEAD", cwd=dest) == base

    # What a previous run's agent could leave behind.
    marker = tmp_path / "hook-ran"
    hook = dest / ".git" / "hooks" / "post-checkout"
    for sub in ("hooks", "info"):  # the workspace's git dir is made without templates
        (dest / ".git" / sub).mkdir(exist_ok=True)
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    (dest / ".git" / "info" / "planted").write_text("x")
    with open(dest / ".git" / "config", "a") as fh:
        fh.write("[core]\n\thooksPath = .git/hooks\n\tfsmonitor = touch " + str(marker) + "\n")
    (dest / "junk.txt").write_text("left over")
    (dest / "build").mkdir()
    (dest / "build" / "out.o").write_text("obj")
    (dest / "app" / "config.py").write_text("tampered\n")
    (dest / "README.md").unlink()

    newer = commit_on(origin, "main", {"CHANGELOG.md": "# Changelog\n\n- newer\n"})
    host.checkout(repo, newer, dest)
    assert not marker.exists(), "a planted hook or config ran"
    assert not (dest / ".git" / "info" / "planted").exists()
    assert not hook.exists()
    assert "hooksPath" not in (dest / ".git" / "config").read_text()
    assert not (dest / "junk.txt").exists() and not (dest / "build").exists()
    assert (dest / "app" / "config.py").read_text().endswith("RETRIES = 1\n")
    assert (dest / "README.md").exists() and (dest / "CHANGELOG.md").read_text().endswith("- newer\n")
    assert git_text("rev-parse", "HEAD", cwd=dest) == newer
    assert git_text("status", "--porcelain", "--ignored", cwd=dest) == ""
    # plain `git` (hooks and config as a user would have them) also finds nothing planted
    plain = subprocess.run(["git", "checkout", "-q", "--detach", "HEAD"], cwd=dest, capture_output=True)
    assert plain.returncode == 0 and not marker.exists()


def test_checkout_replaces_a_git_symlink_or_file(host, repo, tmp_path):
    base = host.resolve_base(repo, "main")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    dest = tmp_path / "ws"
    dest.mkdir()
    os.symlink(outside, dest / ".git")  # the agent swapped .git for a link to somewhere else
    host.checkout(repo, base, dest)
    assert (dest / ".git").is_dir() and not (dest / ".git").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]  # nothing written through the link
    shutil_rm(dest / ".git")
    (dest / ".git").write_text(f"gitdir: {outside}\n")
    host.checkout(repo, base, dest)
    assert (dest / ".git").is_dir() and git_text("rev-parse", "HEAD", cwd=dest) == base
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def test_untracked_file_in_the_way_is_a_clear_final_error(tmp_path):
    bare = make_repo(tmp_path / "origin.git", FILES)
    work = tmp_path / "work"
    run_git("clone", "-q", str(bare), str(work))
    host = LocalGitCodeHost(Settings(home=tmp_path / "home"))
    repo = RepoPolicy(name="demo", url=str(work))
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(work, base, {"app/new.py": "NEW = 1\n"}))
    (work / "app" / "new.py").write_text("my untracked draft\n")
    with pytest.raises(CodeHostError) as err:
        host.merge(repo, change, change.head_sha, MERGE_MSG)
    assert not err.value.retryable and "app/new.py" in str(err.value)
    assert git_text("rev-parse", "main", cwd=work) == base
    assert (work / "app" / "new.py").read_text() == "my untracked draft\n"


def test_quoted_trailer_in_another_commit_does_not_fake_a_revert(host, repo, origin):
    """A later commit whose message quotes "Conveyor-Reverts: <task>" (task text, agent summary)
    must not make the real revert a silent no-op."""
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(origin, base, CHANGE))
    merged = host.merge(repo, change, change.head_sha, MERGE_MSG).merge_sha
    commit_on(origin, "main", {"README.md": "# upload-service\n\nLater.\n"},
              message=f"Other task\n\n    Conveyor-Reverts: {TASK}\nX-Conveyor-Reverts: {TASK}\n")
    message = f"Revert\n\nThis reverts merge {merged}.\nConveyor-Reverts: {TASK}\n"
    result = host.revert(repo, "main", merged, message, TASK, emergency=True)
    assert not result.already
    assert g(origin, "rev-parse", "main") == result.revert_sha
    assert g(origin, "show", "main:app/config.py").endswith("RETRIES = 1")


def test_quoted_task_trailer_does_not_fake_a_merge(host, repo, origin):
    base = host.resolve_base(repo, "main")
    change = host.publish(repo, publish_request(origin, base, CHANGE))
    # someone's merge on main quotes this task's trailer (indented): not our merge
    side = commit_on(origin, "main", {"README.md": "# upload-service\n\nSide.\n"})
    assert side
    gd = origin if is_bare(origin) else origin / ".git"
    tree = git_text("rev-parse", "main^{tree}", git_dir=gd)
    fake = git_text("commit-tree", tree, "-p", "main", "-p", base, git_dir=gd,
                    input=f"Merge other\n\n    Conveyor-Task: {TASK}\n".encode())
    if is_bare(origin):
        run_git("update-ref", "refs/heads/main", fake, git_dir=gd)
    else:
        run_git("merge", "-q", "--ff-only", fake, cwd=origin)
    result = host.merge(repo, change, change.head_sha, MERGE_MSG)
    assert result.outcome == "merged" and result.detail != "already merged"
    assert g(origin, "rev-parse", "main") == result.merge_sha != fake


@pytest.mark.parametrize("how", ["rename", "copy"])
def test_renamed_in_tree_symlink_that_escapes_is_refused(host, tmp_path, how):
    """`sub/link -> ../README.md` stays in the tree; renamed or copied to the top it points out of
    it. The patch text shows no mode, so only the applied tree can tell."""
    bare = make_repo(tmp_path / "sym.git", FILES)
    with tempfile.TemporaryDirectory() as work:
        run_git("clone", "-q", str(bare), work)
        (Path(work) / "sub").mkdir()
        os.symlink("../README.md", Path(work) / "sub" / "link")
        run_git("add", "sub", cwd=work)
        run_git("commit", "-q", "-m", "in-tree link", cwd=work)
        run_git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
    repo = RepoPolicy(name="sym", url=str(bare))
    base = host.resolve_base(repo, "main")
    verb = "rename" if how == "rename" else "copy"
    patch = f"diff --git a/sub/link b/link\nsimilarity index 100%\n{verb} from sub/link\n{verb} to link\n".encode()
    from adapters.patch import validate_patch

    validate_patch(patch, 10**6)  # the text alone passes...
    req = publish_request(bare, base, {}).model_copy(update={"patch": patch})
    with pytest.raises(CodeHostError, match="points outside the tree") as err:
        host.publish(repo, req)  # ...the applied tree does not
    assert not err.value.retryable
    assert git_text("for-each-ref", "refs/heads/conveyor/", git_dir=bare) == ""


def test_in_tree_symlink_still_publishes(host, tmp_path):
    bare = make_repo(tmp_path / "ok.git", FILES)
    repo = RepoPolicy(name="ok", url=str(bare))
    base = host.resolve_base(repo, "main")
    patch = (b"diff --git a/docs/link b/docs/link\nnew file mode 120000\nindex 0000000..1111111\n--- /dev/null\n"
             b"+++ b/docs/link\n@@ -0,0 +1 @@\n+../README.md\n\\ No newline at end of file\n")
    change = host.publish(repo, publish_request(bare, base, {}).model_copy(update={"patch": patch}))
    assert git_text("cat-file", "-p", f"{change.head_sha}:docs/link", git_dir=bare) == "../README.md"
