"""Workspace preparation with the GitHub code host, over real git smart HTTP (the local emulator).

Baseline (same process, same repository, same server): a naive per-task `git clone` over HTTPS.
Measured: GitHubCodeHost.checkout cold (mirror fetch + copy), and warm (a workspace left by an
earlier task moved to a newer commit: only changed files are rewritten).

    python bench/bench_github_checkout.py [FILES] [COMMITS]
"""

from __future__ import annotations

import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.codehost.github import GitHubCodeHost  # noqa: E402
from conveyor.config import GitHubSettings, RepoPolicy, Settings  # noqa: E402
from tests.emulators.github_api import GitHubEmulator  # noqa: E402

TOKEN = "ghp_bench"


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def build_repo(root: Path, files: int, commits: int) -> tuple[Path, list[str]]:
    work = root / "seed"
    run("git", "init", "-q", "-b", "main", str(work))
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@x"}
    for i in range(files):
        path = work / f"pkg{i % 50}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {i}\n" + "VALUE = 1\n" * 40)
    run("git", "add", "-A", cwd=work, env=env)
    run("git", "commit", "-qm", "initial", cwd=work, env=env)
    shas = [run("git", "rev-parse", "HEAD", cwd=work)]
    for c in range(1, commits):
        for j in range(10):
            (work / f"pkg{j}" / f"mod{j}.py").write_text(f"# module {j} v{c}\n" + "VALUE = 2\n" * 40)
        run("git", "commit", "-qam", f"change {c}", cwd=work, env=env)
        shas.append(run("git", "rev-parse", "HEAD", cwd=work))
    bare = root / "origin.git"
    run("git", "clone", "-q", "--bare", str(work), str(bare))
    return bare, shas


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    files = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    commits = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    with tempfile.TemporaryDirectory() as tmp, GitHubEmulator() as emu:
        root = Path(tmp)
        bare, shas = build_repo(root, files, commits)
        emu.add_token(TOKEN)
        emu.add_repo("acme", "bench", bare)
        url = emu.repo_url("acme", "bench")
        header = "Authorization: Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()

        naive = []
        for i in range(3):
            dest = root / f"naive{i}"
            naive.append(timed(lambda: run("git", "-c", f"http.extraHeader={header}", "clone", "-q", url + ".git", str(dest))))

        host = GitHubCodeHost(Settings(home=root / "home"), GitHubSettings(token=TOKEN, api_url=emu.api_url),
                              pacing=(0, 0))
        policy = RepoPolicy(name="bench", url=url, host="github")
        cold = timed(lambda: host.checkout(policy, shas[-1], root / "ws-cold"))
        cold_mirror_warm = [timed(lambda i=i: host.checkout(policy, shas[-1], root / f"ws-fresh{i}")) for i in range(3)]
        warm = [timed(lambda sha=sha: host.checkout(policy, sha, root / "ws-cold")) for sha in shas[-4:-1]]

        base = statistics.median(naive)
        print(f"repository: {files} files, {commits} commits, served by git http-backend on 127.0.0.1")
        print(f"naive git clone over HTTP (baseline)        : {base * 1000:8.1f} ms")
        print(f"checkout, first ever (mirror fetch + copy)  : {cold * 1000:8.1f} ms  ({cold / base:.2f}x baseline)")
        print(f"checkout, fresh workspace, mirror up to date: {statistics.median(cold_mirror_warm) * 1000:8.1f} ms  "
              f"({statistics.median(cold_mirror_warm) / base:.2f}x baseline)")
        print(f"checkout, warm workspace -> other commit    : {statistics.median(warm) * 1000:8.1f} ms  "
              f"({statistics.median(warm) / base:.2f}x baseline)")


if __name__ == "__main__":
    main()
