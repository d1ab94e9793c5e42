"""Context build time on a large synthetic repository (default 50,000 commits, 20,000 files).

The repository is generated once with `git fast-import` (bare, cached under the temp dir and
reused by later runs) and its generation time is reported separately. The goal is a context
build under 1 s. Ratios are against a bare `git rev-parse` subprocess measured in the same
process, so they carry across machines.

    python bench/bench_context.py [--commits N] [--files N] [--runs N] [--fresh]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.context import build_context  # noqa: E402
from adapters.context.gitdir import GitDirSource  # noqa: E402
from conveyor.config import RepoPolicy, Settings  # noqa: E402
from conveyor.models import Origin  # noqa: E402

TOP_DIRS = 20
SUB_DIRS = 20

AGENTS_MD = """# Synthetic service

Packages live in `pkg00/` through `pkg19/`; shared helpers in `pkg00/mod00/file0000.py`.
The old scheduler was in `scheduler/legacy.py` (removed).

Run the tests with `make test` before finishing; lint with `ruff check .`.

```sh
python3 -m pytest -q pkg00
./scripts/smoke.sh
```
"""


def git(*args: str, cwd: Path | None = None, input: bytes | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, input=input, check=True, capture_output=True).stdout


def file_paths(n_files: int) -> list[str]:
    per_leaf = max(1, n_files // (TOP_DIRS * SUB_DIRS))
    paths = []
    for i in range(n_files):
        leaf = (i // per_leaf) % (TOP_DIRS * SUB_DIRS)
        paths.append(f"pkg{leaf // SUB_DIRS:02d}/mod{leaf % SUB_DIRS:02d}/file{i:04d}.py")
    return paths


def fast_import_stream(n_commits: int, n_files: int, out) -> None:
    """Write a fast-import stream: one commit adding every file (and AGENTS.md), then commits
    touching 1-3 files each. Deterministic (seeded), so the cached repo is the same everywhere."""
    rng = random.Random(1234)
    paths = file_paths(n_files)
    when = 1_700_000_000
    w = out.write

    def data(payload: bytes) -> None:
        w(b"data %d\n" % len(payload))
        w(payload)
        w(b"\n")

    w(b"commit refs/heads/main\nmark :1\n")
    w(b"author Bench <bench@example.com> %d +0000\ncommitter Bench <bench@example.com> %d +0000\n" % (when, when))
    data(b"initial import")
    w(b"M 100644 inline AGENTS.md\n")
    data(AGENTS_MD.encode())
    w(b"M 100644 inline Makefile\n")
    data(b"test:\n\tpython3 -m pytest -q\n")
    for i, path in enumerate(paths):
        w(b"M 100644 inline %s\n" % path.encode())
        data(b"VALUE = %d\n" % i)
    w(b"\n")
    for c in range(2, n_commits + 1):
        when += 60
        touched = rng.sample(range(n_files), rng.randint(1, 3))
        w(b"commit refs/heads/main\nmark :%d\n" % c)
        w(b"author Dev%d <dev%d@example.com> %d +0000\n" % (c % 17, c % 17, when))
        w(b"committer Dev%d <dev%d@example.com> %d +0000\n" % (c % 17, c % 17, when))
        data(b"change %d: adjust %s" % (c, paths[touched[0]].encode()))
        w(b"from :%d\n" % (c - 1))
        for t in touched:
            w(b"M 100644 inline %s\n" % paths[t].encode())
            data(b"VALUE = %d\n" % (c * 7 + t))
        w(b"\n")


def ensure_repo(n_commits: int, n_files: int, fresh: bool) -> tuple[Path, float | None]:
    """The cached bare repository, generated if missing. Returns (path, generation seconds or None)."""
    root = Path(tempfile.gettempdir()) / f"conveyor-bench-context-{n_commits}x{n_files}.git"
    marker = root / "conveyor-bench-complete"
    if fresh and root.exists():
        shutil.rmtree(root)
    if marker.exists():
        return root, None
    if root.exists():
        shutil.rmtree(root)  # a half-built one from an interrupted run
    started = time.perf_counter()
    git("init", "-q", "--bare", "-b", "main", str(root))
    proc = subprocess.Popen(["git", "fast-import", "--quiet", "--done"], cwd=root, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    fast_import_stream(n_commits, n_files, proc.stdin)
    proc.stdin.write(b"done\n")
    proc.stdin.close()
    if proc.wait() != 0:
        raise SystemExit("git fast-import failed")
    marker.write_text("ok\n")
    return root, time.perf_counter() - started


def timed(fn, runs: int) -> tuple[float, list[float]]:
    first_started = time.perf_counter()
    fn()
    first = time.perf_counter() - first_started
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return first, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=50_000)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="regenerate the cached repository")
    args = parser.parse_args()

    repo_path, gen_s = ensure_repo(args.commits, args.files, args.fresh)
    if gen_s is None:
        print(f"repository: {repo_path} (cached; --fresh regenerates)")
    else:
        print(f"repository: {repo_path} generated in {gen_s:.1f} s ({args.commits} commits, {args.files} files, git fast-import)")
    head = git("rev-parse", "main", cwd=repo_path).decode().strip()
    n_files = len(git("ls-tree", "-r", "--name-only", head, cwd=repo_path).splitlines())
    n_commits = int(git("rev-list", "--count", head, cwd=repo_path).decode())
    print(f"verified: {n_commits} commits, {n_files} files at {head[:10]}")

    policy = RepoPolicy(name="bench", url=str(repo_path), linear_team="ENG")
    origin = Origin(source="slack", conversation=["the retry test flakes", "/agent fix the flaky retry test"])
    text = "Fix the flaky retry test in pkg03."

    _, baseline = timed(lambda: git("rev-parse", "HEAD", cwd=repo_path), args.runs)
    base_ms = statistics.median(baseline) * 1000
    print(f"baseline: `git rev-parse` subprocess {base_ms:.1f} ms (median of {args.runs})")

    hosts = [("gitdir helper", GitDirSource())]
    try:
        from adapters.codehost.local_git import LocalGitCodeHost

        hosts.append(("local git code host", LocalGitCodeHost(Settings(home=Path(tempfile.mkdtemp(prefix="conveyor-bench-home-"))))))
    except ImportError:
        pass
    worst = 0.0
    doc = None
    for label, host in hosts:
        first, samples = timed(lambda: build_context(host, policy, head, text, origin), args.runs)
        doc = build_context(host, policy, head, text, origin)
        median = statistics.median(samples)
        worst = max(worst, first, median)
        print(
            f"build_context via {label}: first {first * 1000:.0f} ms, median {median * 1000:.0f} ms, "
            f"max {max(samples) * 1000:.0f} ms over {args.runs} runs ({median * 1000 / base_ms:.0f}x baseline)"
        )
    assert doc is not None
    print(f"document: {len(doc.text)} characters, {len(doc.warnings)} warnings, {len(doc.cut)} cuts")
    for warning in doc.warnings:
        print(f"  warning: {warning[:160]}")
    verdict = "MET" if worst < 1.0 else "MISSED"
    print(f"goal < 1 s per build: {verdict} (worst {worst * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
