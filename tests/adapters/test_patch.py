"""validate_patch on patches made by real git, and the trusted apply's own symlink check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.codehost.base import CodeHostError, PublishRequest
from adapters.codehost.local_git import LocalGitCodeHost
from adapters.git import git_text, run_git
from adapters.patch import PatchRejected, validate_patch
from conveyor.config import RepoPolicy, Settings
from conveyor.models import Identity

MB = 1024 * 1024


def work_repo(path: Path, files: dict[str, str | bytes]) -> Path:
    run_git("init", "-q", "--initial-branch=main", str(path))
    write(path, files)
    run_git("add", "-A", cwd=path)
    run_git("commit", "-q", "-m", "base", cwd=path)
    return path


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)


def diff(repo: Path) -> bytes:
    """What the sandbox hands back: every change (new files too) as one binary diff."""
    run_git("add", "-A", cwd=repo)
    return run_git("diff", "--cached", "--binary", "HEAD", cwd=repo)


@pytest.fixture
def repo(tmp_path) -> Path:
    return work_repo(
        tmp_path / "w",
        {"README.md": "hello\n", "src/app.py": "x = 1\n", "logo.bin": bytes(range(256)) * 4},
    )


def test_accepts_edits_adds_deletes(repo):
    write(repo, {"src/app.py": "x = 2\ny = 3\n", "src/new.py": "print('hi')\n"})
    (repo / "README.md").unlink()
    stats = validate_patch(diff(repo), MB)
    assert sorted(stats.files) == ["README.md", "src/app.py", "src/new.py"]
    assert (stats.lines_added, stats.lines_removed) == (3, 2)


def test_accepts_binary_files(repo):
    write(repo, {"logo.bin": bytes(reversed(range(256))) * 8, "img/new.png": b"\x89PNG\r\n\x1a\n" + os.urandom(600)})
    patch = diff(repo)
    assert b"GIT binary patch" in patch
    assert sorted(validate_patch(patch, MB).files) == ["img/new.png", "logo.bin"]


def test_accepts_renames(repo):
    run_git("mv", "src/app.py", "src/application.py", cwd=repo)
    patch = diff(repo)
    assert b"rename from src/app.py" in patch
    assert validate_patch(patch, MB).files == ["src/application.py"]


def test_accepts_quoted_unicode_and_odd_paths(repo):
    write(repo, {"docs/héllo wörld.md": "bonjour\n", 'docs/tab\there "q".txt': "x\n", "docs/two words.md": "y\n"})
    os.symlink("two words.md", repo / "docs" / "link with space")
    patch = diff(repo)
    assert b"diff --git a/docs/two words.md b/docs/two words.md\n" in patch
    assert b"+++ b/docs/two words.md\t\n" in patch
    assert b'"b/docs/h\\303\\251llo w\\303\\266rld.md"' in patch  # git's C-quoting with octal bytes
    stats = validate_patch(patch, MB)
    assert sorted(stats.files) == ["docs/héllo wörld.md", "docs/link with space", 'docs/tab\there "q".txt', "docs/two words.md"]
    # the space-in-name path is still tracked as a symlink: pointing it out is refused
    (repo / "docs" / "link with space").unlink()
    os.symlink("/etc", repo / "docs" / "link with space")
    with pytest.raises(PatchRejected, match="points outside"):
        validate_patch(diff(repo), MB)


def _retarget(patch: bytes, old: str, new: str) -> bytes:
    """Rewrite a real patch so it names `new` instead of `old` (what a hostile agent could send)."""
    return patch.replace(f"a/{old}".encode(), f"a/{new}".encode()).replace(f"b/{old}".encode(), f"b/{new}".encode())


@pytest.mark.parametrize(
    "evil, why",
    [
        ("../outside.txt", "leaves the tree"),
        ("src/../../outside.txt", "leaves the tree"),
        ("./src/app.py", "not normalized"),
        ("src//app.py", "not normalized"),
        (".git/config", "git metadata"),
        (".GIT/hooks/post-checkout", "git metadata"),
        ("a/.git/x", "git metadata"),
        ("vendor/lib/.Git/config", "git metadata"),
        (".git~1/config", "git metadata"),  # the 8.3 short name of .git on NTFS
        ("GIT~1/config", "git metadata"),  # ...as Windows actually spells it
        (".g\u200cit/config", "git metadata"),  # HFS+ ignores U+200C: this is .git on a Mac
        ("x/\ufeff.GIT/hooks/pre-commit", "git metadata"),
        (".git./config", "git metadata"),  # NTFS drops trailing dots
        (".git::$INDEX_ALLOCATION/config", "git metadata"),  # NTFS alternate data stream
    ],
)
def test_refuses_paths_outside_or_into_git(repo, evil, why):
    write(repo, {"src/app.py": "x = 2\n"})
    patch = _retarget(diff(repo), "src/app.py", evil)
    with pytest.raises(PatchRejected, match=why):
        validate_patch(patch, MB)


def test_refuses_absolute_paths(repo):
    write(repo, {"src/app.py": "x = 2\n"})
    # `diff --git a//etc/passwd`: the prefix is stripped, leaving an absolute path.
    with pytest.raises(PatchRejected, match="absolute path"):
        validate_patch(_retarget(diff(repo), "src/app.py", "/etc/passwd"), MB)
    # `--- /etc/passwd` without the a/ prefix
    patch = diff(repo).replace(b"--- a/src/app.py", b"--- /etc/passwd")
    with pytest.raises(PatchRejected, match="prefix"):
        validate_patch(patch, MB)


def test_refuses_rename_out_of_the_tree(repo):
    run_git("mv", "src/app.py", "src/moved.py", cwd=repo)
    patch = diff(repo).replace(b"rename to src/moved.py", b"rename to ../moved.py")
    with pytest.raises(PatchRejected, match="leaves the tree"):
        validate_patch(patch, MB)


@pytest.mark.parametrize(
    "target",
    ["/etc/passwd", "../../etc/shadow", "src/../../x", "..", ".git/hooks", ".GIT", "src/../.git/config", ".g\u200cit/hooks"],
)
def test_refuses_symlinks_pointing_out_or_into_git(repo, target):
    os.symlink(target, repo / "link")
    patch = diff(repo)
    assert b"new file mode 120000" in patch
    with pytest.raises(PatchRejected, match="points outside the tree"):
        validate_patch(patch, MB)


def test_refuses_retargeting_an_existing_symlink(tmp_path):
    repo = tmp_path / "w"
    repo.mkdir()
    os.symlink("README.md", repo / "link")
    work_repo(repo, {"README.md": "hi\n"})
    (repo / "link").unlink()
    os.symlink("/etc/passwd", repo / "link")
    patch = diff(repo)
    assert b"new file mode" not in patch and b"120000" in patch  # `index abc..def 120000`
    with pytest.raises(PatchRejected, match="points outside"):
        validate_patch(patch, MB)


def test_accepts_symlinks_inside_the_tree(repo):
    os.symlink("src/app.py", repo / "link")
    os.symlink("../README.md", repo / "src" / "readme-link")
    assert sorted(validate_patch(diff(repo), MB).files) == ["link", "src/readme-link"]


def test_refuses_submodule_gitlinks(repo):
    head = git_text("rev-parse", "HEAD", cwd=repo)
    run_git("update-index", "--add", "--cacheinfo", f"160000,{head},vendor/sub", cwd=repo)
    patch = run_git("diff", "--cached", "--binary", "HEAD", cwd=repo)
    assert b"new file mode 160000" in patch
    with pytest.raises(PatchRejected, match="submodule"):
        validate_patch(patch, MB)


def test_refuses_oversize_patches_and_too_many_files(repo):
    write(repo, {f"gen/f{i}.txt": f"{i}\n" * 50 for i in range(5)})
    patch = diff(repo)
    assert validate_patch(patch, len(patch)).size == len(patch)
    with pytest.raises(PatchRejected, match="the limit is"):
        validate_patch(patch, len(patch) - 1)
    with pytest.raises(PatchRejected, match="5 files; the limit is 4"):
        validate_patch(patch, MB, max_files=4)


@pytest.mark.parametrize(
    "patch, why",
    [
        (b"diff --git a/x\n", "malformed diff header"),
        (b"diff --git a/x b/y c/z\n", "malformed diff header"),
        (b'diff --git "a/x b/x\n', "malformed diff header|prefix"),
        (b"diff --git a/x y b/z y\n", "malformed diff header"),  # ambiguous unquoted names
        (b"diff --git x/foo y/foo\n", "prefix"),
        (b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n", "before its first diff header"),
        (b"hello\ndiff --git a/x b/x\n", "before its first diff header"),
        (b"diff --git a/x b/x\n--- a/x\n+++ b/\0evil\n", "NUL"),
    ],
)
def test_refuses_malformed_headers(patch, why):
    with pytest.raises(PatchRejected, match=why):
        validate_patch(patch, MB)


def test_trusted_apply_refuses_writing_through_an_existing_symlink(tmp_path):
    """validate_patch sees only the patch; the tree it lands on may already hold a symlink that
    points out. `git apply` itself refuses to write beyond a symlink: prove publish relies on it."""
    seed = tmp_path / "seed"
    seed.mkdir()
    os.symlink("/tmp", seed / "out")  # committed on base by someone else
    work_repo(seed, {"README.md": "hi\n"})
    bare = tmp_path / "origin.git"
    run_git("clone", "-q", "--bare", str(seed), str(bare))

    (seed / "out").unlink()
    (seed / "out").mkdir()
    marker = f"conveyor-escape-{os.getpid()}-{tmp_path.name}.txt"
    write(seed, {f"out/{marker}": "pwned\n"})
    patch = diff(seed)
    assert validate_patch(patch, MB).files[-1] == f"out/{marker}"  # looks harmless on its own

    settings = Settings(home=tmp_path / "home")
    host = LocalGitCodeHost(settings)
    policy = RepoPolicy(name="r", url=str(bare))
    base = host.resolve_base(policy, "main")
    # Only the file, not the symlink deletion: the patch writes *through* the existing link.
    only_file = b"diff --git" + patch.split(b"diff --git")[-1]
    request = PublishRequest(
        task_id="cv-000000000001",
        branch="conveyor/cv-000000000001-escape",
        base="main",
        base_sha=base,
        patch=only_file,
        commit_message="escape\n",
        title="escape",
        body="",
        requester=Identity(kind="local", id="alice"),
    )
    with pytest.raises(CodeHostError) as err:
        host.publish(policy, request)
    assert not err.value.retryable
    assert "beyond a symbolic link" in str(err.value)
    assert not Path("/tmp", marker).exists()
    assert git_text("branch", "--list", git_dir=bare) == "* main"
    assert not list((settings.home / "changes").rglob("*.json"))
