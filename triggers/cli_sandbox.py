"""`conveyor sandbox run --repo PATH_OR_NAME [--allow-domain D]... [--memory MB] [--pids N]
[--timeout S] -- CMD...`: run one command in a fresh clone of a repository under its sandbox
policy, and say how it ended (exit code, or which limit stopped it).

Exit status: the command's own exit code; 124 when the wall clock stopped it; 125 when another
limit did (memory, pids, disk, output cap); 2 when the sandbox was refused or the input was bad.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from conveyor.config import ConfigError, RepoPolicy, SandboxPolicy, Settings, adhoc_repo_policy, load_config

EXIT_TIMEOUT = 124
EXIT_LIMIT = 125
EXIT_REFUSED = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sandbox", help="run a command in the sandbox a task would get")
    commands = parser.add_subparsers(dest="sandbox_command", required=True)
    run = commands.add_parser(
        "run",
        help="run CMD in a fresh clone of a repository under its sandbox policy",
        description="Run CMD (after --) in a fresh clone of the repository, sandboxed by the repo's policy.",
    )
    run.add_argument("--repo", required=True, help="path to a git repository, or a repo name from conveyor.toml")
    run.add_argument("--allow-domain", action="append", default=[], metavar="D",
                     help="also allow egress to D (exact name or *.example.com); repeatable")
    run.add_argument("--memory", type=int, metavar="MB", help="memory cap in MB")
    run.add_argument("--pids", type=int, metavar="N", help="process cap")
    run.add_argument("--timeout", type=float, metavar="S", help="wall clock in seconds")
    run.add_argument("--backend", choices=["local", "modal"], help="override the policy's backend")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    run.set_defaults(func=run_command)


def _policy_for(repo: str, settings: Settings) -> RepoPolicy:
    if os.sep in repo or repo.startswith(".") or Path(repo).exists():
        return adhoc_repo_policy(repo)
    return load_config(settings).repo(repo)


def _clone(policy: RepoPolicy, into: Path) -> None:
    """A plain `git clone --shared` (local) or shallow clone, hooks off, worker env not passed."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(into.parent), "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
    source = policy.url
    local = "://" not in source and not source.startswith("git@")
    args = ["git", "-c", "core.hooksPath=/dev/null", "clone", "--quiet"]
    args += ["--shared"] if local else ["--depth", "1", "--branch", policy.base]
    subprocess.run([*args, source, str(into)], check=True, capture_output=True, env=env, timeout=600)
    if local:
        has_base = subprocess.run(["git", "-C", str(into), "rev-parse", "--verify", "--quiet", f"origin/{policy.base}"],
                                  capture_output=True, env=env)
        if has_base.returncode == 0:
            subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "-C", str(into), "checkout", "--quiet", "--detach",
                            f"origin/{policy.base}"], check=True, capture_output=True, env=env)


def run_command(args: argparse.Namespace) -> int:
    from adapters.sandbox import get_sandbox
    from adapters.sandbox.base import Outcome, SandboxSpec, git_alternates
    from adapters.sandbox.output import printable

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("conveyor sandbox run: give the command after --, e.g. -- make test", file=sys.stderr)
        return EXIT_REFUSED
    settings = Settings()
    try:
        repo = _policy_for(args.repo, settings)
        overrides = {"allow_domains": [*repo.sandbox.allow_domains, *args.allow_domain]}
        if args.backend:
            overrides["backend"] = args.backend
        sandbox_policy = SandboxPolicy(**{**repo.sandbox.model_dump(), **overrides})
    except ConfigError as exc:
        print(f"conveyor sandbox run: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ValidationError as exc:
        print(f"conveyor sandbox run: {exc.errors()[0]['msg']}", file=sys.stderr)
        return EXIT_REFUSED
    limits = {}
    for key, value in (("memory_mb", args.memory), ("pids", args.pids), ("wall_clock_s", args.timeout)):
        if value is not None:
            if value <= 0:
                print(f"conveyor sandbox run: {key} must be positive", file=sys.stderr)
                return EXIT_REFUSED
            limits[key] = value
    sandbox = get_sandbox(sandbox_policy, settings)
    with tempfile.TemporaryDirectory(prefix="conveyor-sandbox-") as tmp:
        workspace = Path(tmp) / "workspace"
        try:
            _clone(repo, workspace)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            err = getattr(exc, "stderr", b"") or b""
            print(f"conveyor sandbox run: cannot clone {repo.url}: {err.decode(errors='replace').strip()}", file=sys.stderr)
            return EXIT_REFUSED
        # the clone borrows the repository's objects (--shared): bind them read-only
        spec = SandboxSpec.from_policy(sandbox_policy, workspace, cmd, read_only_paths=git_alternates(workspace), **limits)
        result = asyncio.run(sandbox.run(spec))
    sys.stdout.write(printable(result.output))
    if result.output and not result.output.endswith(b"\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    for line in result.egress:
        print(f"egress: {line}", file=sys.stderr)
    where = f" [{result.sandbox_id}]" if result.sandbox_id else ""
    if result.outcome in (Outcome.ok, Outcome.exit_nonzero):
        print(f"outcome: exited with {result.exit_code} in {result.duration_s:.2f}s{where}", file=sys.stderr)
        return min(max(result.exit_code or 0, 0), 255)
    print(f"outcome: {result.outcome.value}: {result.detail}{where}", file=sys.stderr)
    if result.outcome == Outcome.refused:
        return EXIT_REFUSED
    return EXIT_TIMEOUT if result.outcome == Outcome.timeout else EXIT_LIMIT


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (the main CLI registers this subcommand itself)."""
    parser = argparse.ArgumentParser(prog="conveyor")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
