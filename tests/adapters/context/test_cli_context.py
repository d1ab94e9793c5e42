"""`conveyor context` end to end: the real CLI entry point in a subprocess, on a real repo,
through the local git code host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.adapters.context.test_context import Repo

ROOT = Path(__file__).resolve().parents[3]


def conveyor(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LINEAR_", "CONVEYOR_"))}
    env.update({"CONVEYOR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "triggers.cli", "context", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)


def test_prints_document_and_warnings(tmp_path: Path):
    repo = Repo(tmp_path / "r")
    repo.commit("init", {"AGENTS.md": "Code lives in `src/app/` and `src/gone.py`.\n", "src/app/x.py": "x = 1\n"})
    proc = conveyor(tmp_path, "--repo", str(repo.path), "make", "it", "faster")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("# Startup context: r-")
    assert "## Task\n\nmake it faster\n" in out
    assert "Code lives in `src/app/` and `src/gone.py`." in out
    assert "warnings (1):\n  - AGENTS.md mentions paths that do not exist at the base commit: src/gone.py" in out


def test_json_and_skeleton_for_a_repo_without_agents_md(tmp_path: Path):
    repo = Repo(tmp_path / "r")
    repo.commit("init", {"package.json": "{}\n", "lib/index.js": "\n"})
    proc = conveyor(tmp_path, "--repo", str(repo.path), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["instructions_file"] == "" and "`npm test`" in doc["suggested_agents_md"]
    assert any("no AGENTS.md" in w for w in doc["warnings"])
    text_proc = conveyor(tmp_path, "--repo", str(repo.path))
    assert "suggested AGENTS.md skeleton:" in text_proc.stdout and "- `lib/`: <what lives here>" in text_proc.stdout


def test_bad_repo_is_one_clear_line(tmp_path: Path):
    proc = conveyor(tmp_path, "--repo", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: repository path {str(tmp_path / 'missing')!r} does not exist"
    repo = Repo(tmp_path / "r")
    repo.commit("init", {"a": "1\n"})
    proc = conveyor(tmp_path, "--repo", str(repo.path), "--base", "nope")
    assert proc.returncode == 2 and "nope" in proc.stderr
