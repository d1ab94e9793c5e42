"""The context builder against real git repositories built per test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from adapters.codehost.base import CodeHostError
from adapters.context import ContextDocument, build_context
from adapters.context.gitdir import GitDirSource
from adapters.context.rot import command_executables, extract_mentions
from conveyor.config import RepoPolicy
from conveyor.models import Origin

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Ada",
    "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Ada",
    "GIT_COMMITTER_EMAIL": "ada@example.com",
    "GIT_AUTHOR_DATE": "2026-01-02T03:04:05+00:00",
    "GIT_COMMITTER_DATE": "2026-01-02T03:04:05+00:00",
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "PATH": "/usr/bin:/bin",
}


class Repo:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._git("init", "-q", "-b", "main")

    def _git(self, *args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True, env=GIT_ENV
        ).stdout.strip()

    def commit(self, message: str, files: dict[str, str | None]) -> str:
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self._git("add", "-A")
        self._git("commit", "-q", "-m", message)
        return self._git("rev-parse", "HEAD")

    def policy(self) -> RepoPolicy:
        return RepoPolicy(name="demo", url=str(self.path))


class FakeLinear:
    def __init__(self, issues: list[str] | Exception):
        self.issues = issues
        self.calls: list[tuple[str | None, str | None]] = []

    def agent_issues(self, team: str | None = None, label: str | None = None) -> list[str]:
        self.calls.append((team, label))
        if isinstance(self.issues, Exception):
            raise self.issues
        return self.issues


AGENTS_MD = """# Demo

Code lives in `src/app/` and tests in `tests/`. See [the guide](docs/guide.md).
The old parser was in `src/legacy/parser.py`.

Run the tests with `make test` before you finish.

```sh
$ python3 -m pytest -q
./scripts/check.sh && frobnicate --all
```
"""


def _base_repo(tmp_path: Path, agents: str | None = AGENTS_MD) -> tuple[Repo, str]:
    repo = Repo(tmp_path / "repo")
    files: dict[str, str | None] = {
        "src/app/main.py": "print('hi')\n",
        "tests/test_main.py": "def test(): pass\n",
        "docs/guide.md": "guide\n",
        "Makefile": "test:\n\tpytest\n",
        "pyproject.toml": "[project]\nname='demo'\n",
    }
    if agents is not None:
        files["AGENTS.md"] = agents
    sha = repo.commit("initial layout", files)
    return repo, sha


def test_document_sections_and_rot_warnings(tmp_path: Path):
    repo, _ = _base_repo(tmp_path)
    sha = repo.commit("fix: handle empty input", {"src/app/main.py": "print('hello')\n"})
    origin = Origin(source="slack", conversation=["can someone fix the empty input bug?", "on it: /agent fix it"])
    doc = build_context(GitDirSource(), repo.policy(), sha, "fix the empty input bug", origin, linear=FakeLinear(["ENG-2 b", "ENG-1 a"]))
    assert isinstance(doc, ContextDocument)
    text = doc.text
    # the task first, the instructions verbatim, the dynamic parts present
    assert text.index("## Task") < text.index("## Triggering conversation") < text.index("## Repository instructions (AGENTS.md)")
    assert "fix the empty input bug" in text
    assert "The old parser was in `src/legacy/parser.py`." in text
    assert "> can someone fix the empty input bug?" in text
    assert "Source: Slack thread" in text
    assert f"{sha[:10]} fix: handle empty input (Ada, 2026-01-02)\n  touched: src/app/main.py" in text
    assert "`main` at" in text and "unknown" in text
    assert text.index("- ENG-1 a") < text.index("- ENG-2 b"), "Linear issues sorted for determinism"
    assert doc.instructions_file == "AGENTS.md"
    assert doc.cut == []
    # rot: the missing path and script, the executable the sandbox image lacks; not the ones that exist
    joined = "\n".join(doc.warnings)
    assert "src/legacy/parser.py" in joined
    assert "docs/guide.md" not in joined and "src/app/" not in joined.replace("src/legacy", "")
    assert "./scripts/check.sh" in joined
    assert "frobnicate" in joined
    assert "make (" not in joined and "python3 (" not in joined
    assert "## Notes on the instructions" in text


def test_deterministic_for_same_inputs(tmp_path: Path):
    repo, sha = _base_repo(tmp_path)
    origin = Origin(source="cli")
    a = build_context(GitDirSource(), repo.policy(), sha, "task", origin, linear=FakeLinear(["X-1 one"]))
    b = build_context(GitDirSource(), repo.policy(), sha, "task", origin, linear=FakeLinear(["X-1 one"]))
    assert a == b


def test_fallback_instruction_files(tmp_path: Path):
    repo, _ = _base_repo(tmp_path, agents=None)
    sha = repo.commit("copilot", {".github/copilot-instructions.md": "Use `src/app/main.py` as the entry point.\n"})
    doc = build_context(GitDirSource(), repo.policy(), sha, "task", Origin(source="cli"))
    assert doc.instructions_file == ".github/copilot-instructions.md"
    assert "Use `src/app/main.py` as the entry point." in doc.text
    assert any("no AGENTS.md" in w and "copilot-instructions" in w for w in doc.warnings)
    assert not any("do not exist" in w for w in doc.warnings)
    sha2 = repo.commit("claude", {"CLAUDE.md": "claude rules\n"})
    doc2 = build_context(GitDirSource(), repo.policy(), sha2, "task", Origin(source="cli"))
    assert doc2.instructions_file == "CLAUDE.md"  # CLAUDE.md wins over copilot instructions


def test_missing_agents_md_warns_with_skeleton(tmp_path: Path):
    repo, sha = _base_repo(tmp_path, agents=None)
    doc = build_context(GitDirSource(), repo.policy(), sha, "task", Origin(source="cli"))
    assert doc.instructions_file == ""
    assert any("no AGENTS.md" in w for w in doc.warnings)
    skeleton = doc.suggested_agents_md
    assert skeleton.startswith("# AGENTS.md")
    assert "`python3 -m pytest -q`" in skeleton and "`make`" in skeleton
    assert "- `src/`" in skeleton and "- `tests/`" in skeleton


def test_stale_agents_md(tmp_path: Path):
    repo, _ = _base_repo(tmp_path)
    sha = ""
    for i in range(45):
        sha = repo.commit(f"change {i}", {f"src/app/mod{i}.py": f"x = {i}\n"})
    doc = build_context(GitDirSource(), repo.policy(), sha, "task", Origin(source="cli"))
    stale = [w for w in doc.warnings if "may be stale" in w]
    assert len(stale) == 1
    assert "45 commits changed 45 files under" in stale[0] and "src/app/" in stale[0]
    # Touching AGENTS.md resets the clock.
    sha = repo.commit("docs: refresh agents", {"AGENTS.md": AGENTS_MD + "\nUpdated.\n"})
    doc = build_context(GitDirSource(), repo.policy(), sha, "task", Origin(source="cli"))
    assert not any("may be stale" in w for w in doc.warnings)


def test_churn_outside_described_dirs_is_not_staleness(tmp_path: Path):
    repo, _ = _base_repo(tmp_path)
    sha = ""
    for i in range(45):
        sha = repo.commit(f"vendor {i}", {f"vendor/lib{i}.c": f"int x{i};\n"})
    doc = build_context(GitDirSource(), repo.policy(), sha, "task", Origin(source="cli"))
    assert not any("may be stale" in w for w in doc.warnings)


def test_budget_cuts_least_important_first_and_reports(tmp_path: Path):
    repo, _ = _base_repo(tmp_path, agents="# Rules\n" + "Be careful with the parser.\n" * 400)
    sha = ""
    for i in range(30):
        sha = repo.commit(f"commit number {i} " + "x" * 60, {f"src/app/m{i}.py": "pass\n"})
    issues = [f"ENG-{i} issue title {'y' * 80}" for i in range(40)]
    conversation = ["the original request"] + [f"reply {i} " + "z" * 100 for i in range(20)]
    origin = Origin(source="slack", conversation=conversation)
    full = build_context(GitDirSource(), repo.policy(), sha, "the task", origin, linear=FakeLinear(issues), budget_chars=200_000)
    assert full.cut == []
    budget = len(full.text) - 6000  # more than all the Linear issues (~4.3k)
    doc = build_context(GitDirSource(), repo.policy(), sha, "the task", origin, linear=FakeLinear(issues), budget_chars=budget)
    assert len(doc.text) <= budget
    assert doc.cut[0] == "Open agent-tagged Linear issues: removed entirely (40 items)"
    assert any(c.startswith("Recent commits (newest first): dropped") and "oldest of 30" in c for c in doc.cut)
    assert "commit number 29" in doc.text and "commit number 0 " not in doc.text, "newest commits survive"
    assert "Be careful with the parser." in doc.text and "## Task" in doc.text
    # A tight budget reaches the conversation (keeping the request) and then the instructions.
    tight = build_context(GitDirSource(), repo.policy(), sha, "the task", origin, linear=FakeLinear(issues), budget_chars=4000)
    assert len(tight.text) <= 4000
    assert "the task" in tight.text
    assert [c.split(":")[0] for c in tight.cut][:2] == ["Open agent-tagged Linear issues", "Recent commits (newest first)"]
    assert any("Repository instructions (AGENTS.md): truncated from" in c for c in tight.cut)
    assert "[... truncated to fit the context budget]" in tight.text


def test_linear_failure_is_a_warning_not_an_error(tmp_path: Path):
    repo, sha = _base_repo(tmp_path)
    linear = FakeLinear(RuntimeError("Linear said 500"))
    repo_policy = repo.policy().model_copy(update={"linear_team": "ENG"})
    doc = build_context(GitDirSource(), repo_policy, sha, "task", Origin(source="cli"), linear=linear)
    assert linear.calls == [("ENG", None)]
    assert any("agent-tagged Linear issues" in w and "Linear said 500" in w for w in doc.warnings)
    assert "Linear issues" not in doc.text


def test_bad_inputs(tmp_path: Path):
    repo, sha = _base_repo(tmp_path)
    with pytest.raises(ValueError, match="too small"):
        build_context(GitDirSource(), repo.policy(), sha, "t", Origin(source="cli"), budget_chars=10)
    with pytest.raises(CodeHostError, match="does not exist"):
        build_context(GitDirSource(tmp_path / "nope"), repo.policy(), sha, "t", Origin(source="cli"))


def test_mentions_parser():
    m = extract_mentions(
        "See `src/a.py:12`, `https://x.y/z`, `owner/repo`, `foo.bar.baz`, `*.py`, [x](docs/a.md#top), `Makefile`.\n"
        "To build run `npm run build` and `FOO=1 sudo make -j4 check`.\n"
        "```python\nimport os\n```\n"
        "```bash\n# comment\n$ cd sub && ./run.sh | tee log\n```\n"
    )
    assert m.paths == ["src/a.py", "Makefile", "docs/a.md"]
    assert m.commands == ["npm run build", "FOO=1 sudo make -j4 check", "cd sub && ./run.sh | tee log"]
    assert command_executables("FOO=1 sudo make -j4 check") == ["make"]
    assert command_executables("cd sub && ./run.sh | tee log") == ["./run.sh", "tee"]


def test_policy_test_command_is_checked(tmp_path: Path):
    repo, sha = _base_repo(tmp_path)
    ok = repo.policy().model_copy(update={"test_command": "make test && python3 -m pytest"})
    doc = build_context(GitDirSource(), ok, sha, "t", Origin(source="cli"))
    assert not any("test_command" in w for w in doc.warnings)
    bad = repo.policy().model_copy(update={"test_command": "tox -e py311"})
    doc = build_context(GitDirSource(), bad, sha, "t", Origin(source="cli"))
    assert any(w.startswith("the repository's test_command uses commands") and "tox (in `tox -e py311`)" in w for w in doc.warnings)
