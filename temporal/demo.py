"""The bundled demo repository `make run` works on: a tiny service with an AGENTS.md."""

from __future__ import annotations

import tempfile
from pathlib import Path

from adapters.git import run_git

FILES = {
    "README.md": "# upload-service\n\nA tiny service used by the Conveyor demo.\n",
    "AGENTS.md": (
        "# AGENTS.md\n\n"
        "- Code lives in `app/`; tests in `tests/`.\n"
        "- Run the tests with `python3 -m unittest discover -s tests`.\n"
        "- Record user-visible changes in `CHANGELOG.md`.\n"
    ),
    "CHANGELOG.md": "# Changelog\n\n",
    "app/__init__.py": "",
    "app/config.py": "# How many times an upload is retried before giving up.\nRETRIES = 1\n",
    "tests/test_config.py": (
        "import unittest\n\nfrom app.config import RETRIES\n\n\n"
        "class ConfigTest(unittest.TestCase):\n"
        "    def test_retries_positive(self):\n"
        "        self.assertGreater(RETRIES, 0)\n"
    ),
}


def make_repo(bare_path: Path, files: dict[str, str], branch: str = "main") -> Path:
    """Create a bare repository at `bare_path` whose `branch` holds `files` in one commit."""
    bare_path.parent.mkdir(parents=True, exist_ok=True)
    run_git("init", "-q", "--bare", f"--initial-branch={branch}", str(bare_path))
    with tempfile.TemporaryDirectory(prefix="conveyor-seed-") as tmp:
        work = Path(tmp)
        run_git("init", "-q", f"--initial-branch={branch}", str(work))
        for name, content in files.items():
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        run_git("add", "-A", cwd=work)
        run_git("commit", "-q", "-m", "Initial commit", cwd=work)
        run_git("push", "-q", str(bare_path), f"HEAD:refs/heads/{branch}", cwd=work)
    return bare_path


def ensure_demo_repo(path: Path) -> Path:
    if (path / "HEAD").is_file():
        return path
    return make_repo(path, FILES)
