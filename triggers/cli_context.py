"""`conveyor context --repo PATH_OR_NAME [TEXT]`: print the startup context an agent would get,
with the AGENTS.md rot warnings and what the size budget cut."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from conveyor.config import ConfigError, RepoPolicy, Settings, adhoc_repo_policy, load_config
from conveyor.models import Origin

DEFAULT_TEXT = "(no task given: this is the context any task on this repository would start with)"


def _current_branch(path: str) -> str | None:
    proc = subprocess.run(["git", "-C", path, "symbolic-ref", "--short", "-q", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def resolve(settings: Settings, repo_arg: str, base: str | None) -> RepoPolicy:
    config = load_config(settings)
    if repo_arg in config.repos:
        policy = config.repo(repo_arg)
        return policy.model_copy(update={"base": base}) if base else policy
    path = Path(repo_arg).expanduser()
    if not path.exists():
        if "/" not in repo_arg and "://" not in repo_arg:
            config.repo(repo_arg)  # raises "unknown repository ... (known: ...)"
        raise ConfigError(f"repository path {repo_arg!r} does not exist")
    known = config.repo_for_url(str(path.resolve()))
    if known is not None:
        return known.model_copy(update={"base": base}) if base else known
    # An ad-hoc path: with no --base, the branch it has checked out (not every repo has `main`).
    return adhoc_repo_policy(str(path), base or _current_branch(str(path)))


def _codehost(repo: RepoPolicy, settings: Settings):
    from adapters.codehost import get_codehost

    return get_codehost(repo, settings)


def run(args: argparse.Namespace) -> int:
    from adapters.codehost.base import CodeHostError
    from adapters.context import build_context
    from adapters.linear import LinearClient

    settings = Settings()
    try:
        repo = resolve(settings, args.repo, args.base)
        host = _codehost(repo, settings)
        base_sha = host.resolve_base(repo, repo.base)
        linear = None if args.no_linear else LinearClient.optional(settings)
        text = " ".join(args.text).strip() or DEFAULT_TEXT
        doc = build_context(host, repo, base_sha, text, Origin(source="cli"), linear=linear, budget_chars=args.budget)
    except (ConfigError, CodeHostError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"repo": repo.name, "base": repo.base, "base_sha": base_sha, **doc.model_dump()}, indent=2))
        return 0
    print(doc.text, end="")
    print(f"\n---\n{len(doc.text)} characters (budget {args.budget}) for {repo.name} at {base_sha[:10]}")
    if doc.cut:
        print("cut to fit the budget:")
        for line in doc.cut:
            print(f"  - {line}")
    if doc.warnings:
        print(f"warnings ({len(doc.warnings)}):")
        for line in doc.warnings:
            print(f"  - {line}")
    else:
        print("no warnings")
    if doc.suggested_agents_md:
        print("\nsuggested AGENTS.md skeleton:\n")
        print(doc.suggested_agents_md)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("context", help="print the startup context an agent would get, with AGENTS.md warnings")
    p.add_argument("--repo", required=True, help="a configured repository name or a local git path")
    p.add_argument("--base", help="base branch (default: the policy's, or the checked-out branch of a path)")
    p.add_argument("--budget", type=int, default=48_000, help="size budget in characters")
    p.add_argument("--no-linear", action="store_true", help="skip the agent-tagged Linear issues")
    p.add_argument("--json", action="store_true")
    p.add_argument("text", nargs="*", help="the task text")
    p.set_defaults(func=run)
