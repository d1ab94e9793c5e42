"""`conveyor`: the CLI trigger and review tool, and the embedded stack's launcher.

Errors print one clear line and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from conveyor.config import ConfigError, RepoPolicy, Settings, adhoc_repo_policy, load_config, local_user
from conveyor.models import Decision, Identity, Origin, Stage, TaskStatus
from triggers import service

PLUGINS = ("triggers.cli_sandbox", "triggers.cli_context", "triggers.slack_app", "triggers.github_webhooks", "triggers.linear_webhooks")
WAITING = {Stage.awaiting_review, Stage.awaiting_checks}
TERMINAL_OR_DONE = {
    Stage.merged, Stage.reverted, Stage.rejected, Stage.cancelled, Stage.expired, Stage.no_changes,
    Stage.too_large, Stage.needs_rebase, Stage.checks_failed, Stage.agent_failed, Stage.failed,
}  # fmt: skip


class CliError(Exception):
    pass


def me() -> Identity:
    user = local_user()
    return Identity(kind="local", id=user, display=user)


def resolve_repo(settings: Settings, repo: str | None, base: str | None) -> RepoPolicy:
    config = load_config(settings)
    if repo and repo in config.repos:
        return config.repo(repo)
    if repo:
        if "/" not in repo and not Path(repo).exists() and "://" not in repo:
            config.repo(repo)  # raises "unknown repository" naming the known ones
        policy = config.repo_for_url(str(Path(repo).resolve()) if Path(repo).exists() else repo)
        return policy or adhoc_repo_policy(repo, base)
    if len(config.repos) == 1:
        return next(iter(config.repos.values()))
    if (Path.cwd() / ".git").exists():
        return adhoc_repo_policy(str(Path.cwd()), base)
    raise CliError("no repository: pass --repo PATH_OR_NAME (or run inside a git repository)")


@asynccontextmanager
async def stack(settings: Settings, need_worker: bool = True):
    """A client to a running server; if none answers, an embedded server (and a worker) for the
    duration of the command. The history stays in the SQLite file either way."""
    from temporal.devserver import DevServer, port_open
    from workers.main import build_worker

    server = None
    if not settings.temporal_address and not os.environ.get("TEMPORAL_ADDRESS"):
        if not port_open("127.0.0.1", settings.temporal_port):
            server = DevServer(settings)
            server.start()
            await server.wait_ready()
    client = await service.connect(settings)
    worker = build_worker(client, settings) if (server is not None and need_worker) else None
    try:
        if worker is not None:
            async with worker:
                yield client
        else:
            yield client
    finally:
        if server is not None:
            server.stop()


def print_status(status: TaskStatus, as_json: bool) -> None:
    if as_json:
        print(status.model_dump_json(indent=2))
        return
    print(f"{status.task_id}  {status.stage.value}  {status.repo}@{status.base}")
    print(f"  task:      {status.text[:120]}")
    print(f"  requester: {status.requester} via {status.source}")
    for label, value in (
        ("branch", status.branch), ("change", status.change_url), ("head", status.head_sha),
        ("approved", status.approved_head), ("merged", status.merge_sha), ("reverted", status.revert_sha),
        ("detail", status.detail), ("sandbox", status.sandbox_id),
    ):  # fmt: skip
        if value:
            print(f"  {label + ':':<10} {value}")
    for warning in status.warnings:
        print(f"  warning:   {warning}")
    print("  audit:")
    for event in status.audit:
        shown = f"{event.by} ({event.principal})" if event.principal and event.principal != event.by else event.by
        who = f" by {shown}" if shown else ""
        via = f" via {event.via}" if event.via else ""
        print(f"    {event.at:%Y-%m-%d %H:%M:%S} {event.action}{who}{via} {event.detail}".rstrip())


async def poll(
    client, task_id: str, done: Callable[[TaskStatus], bool], timeout: float | None = None,
    each: Callable[[TaskStatus], None] | None = None,
) -> TaskStatus:
    """Read the task's status every 100 ms until `done` says so (or the timeout passes)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        status = await service.task_status(client, task_id)
        if each is not None:
            each(status)
        if done(status) or (deadline is not None and loop.time() >= deadline):
            return status
        await asyncio.sleep(0.1)


async def follow(client, task_id: str, until: set[Stage], as_json: bool, seen: list[Stage]) -> TaskStatus:
    """Print each stage as the task moves, until one of `until` (or a terminal stage)."""

    def show(status: TaskStatus) -> None:
        if seen and seen[-1] == status.stage:
            return
        seen.append(status.stage)
        if not as_json:
            extra = f"  {status.change_url}" if status.stage == Stage.awaiting_review and status.change_url else ""
            extra += f"  {status.merge_sha}" if status.stage == Stage.merged else ""
            extra += f"  {status.detail}" if status.stage in TERMINAL_OR_DONE - {Stage.merged} and status.detail else ""
            print(f"  stage: {status.stage.value}{extra}", flush=True)

    return await poll(client, task_id, lambda s: s.stage in until or s.stage in TERMINAL_OR_DONE, each=show)


# ---- commands ------------------------------------------------------------------------------


async def cmd_run(args, settings: Settings) -> int:
    repo = resolve_repo(settings, args.repo, args.base)
    request = service.build_request(
        repo, args.text, me(), Origin(source="cli", delivery_id=""), base=args.base, agent=args.agent
    )
    async with stack(settings) as client:
        started = await service.start_task(client, request, settings)
        if not args.json:
            print(f"task {started.task_id} on {repo.name}@{request.base}")
            print(f"  Temporal UI: {started.ui_url}")
        seen: list[Stage] = []
        status = await follow(client, started.task_id, WAITING, args.json, seen)
        if args.approve and status.stage in WAITING:
            await service.signal_task(client, started.task_id, "approve", Decision(by=me(), via="cli"))
            status = await follow(client, started.task_id, {Stage.merged}, args.json, seen)
        if args.json:
            print(status.model_dump_json(indent=2))
        elif status.stage == Stage.merged:
            print(f"merged: {status.merge_sha} on {repo.name}@{status.base}")
        elif status.stage in WAITING:
            print(f"awaiting review: conveyor approve {status.task_id}  |  conveyor reject {status.task_id} --reason ...")
        return 0 if status.stage in WAITING | {Stage.merged, Stage.no_changes} else 1


async def _decide(args, settings: Settings, signal_name: str) -> int:
    decision = Decision(by=me(), via="cli", reason=getattr(args, "reason", "") or "")
    async with stack(settings) as client:
        before = await service.task_status(client, args.task_id)
        await service.signal_task(client, args.task_id, signal_name, decision)  # type: ignore[arg-type]
        status = await _settle(client, args.task_id, len(before.audit))
        print(f"{args.task_id}: {status.stage.value}" + (f" ({status.detail})" if status.detail else ""))
        refused = [e for e in status.audit[len(before.audit):] if e.action in ("refused", "ignored")]
        for event in refused:
            print(f"  {event.action}: {event.detail}", file=sys.stderr)
        return 1 if any(e.action == "refused" for e in refused) else 0


async def _settle(client, task_id: str, audit_len: int, timeout: float = 30.0) -> TaskStatus:
    """Wait until the signal was recorded and the stage stopped moving (merge, revert landed)."""

    def settled(status: TaskStatus) -> bool:
        busy = status.stage in (Stage.merging, Stage.reverting, Stage.awaiting_checks) or len(status.audit) <= audit_len
        answered = any(e.action in ("refused", "ignored") for e in status.audit[audit_len:])
        return not busy and (status.stage != Stage.awaiting_review or answered)

    return await poll(client, task_id, settled, timeout)


async def cmd_approve(args, settings):
    return await _decide(args, settings, "approve")


async def cmd_reject(args, settings):
    if not args.reason.strip():
        raise CliError("a reason is required: --reason '...'")
    return await _decide(args, settings, "reject")


async def cmd_cancel(args, settings):
    return await _decide(args, settings, "cancel")


async def cmd_revert(args, settings: Settings) -> int:
    decision = Decision(by=me(), via="cli", reason=args.reason or "", emergency=True)
    async with stack(settings) as client:
        how = await service.revert_task(client, args.task_id, decision, settings)
        status = await poll(
            client, args.task_id, lambda s: s.stage == Stage.reverted or bool(s.audit) and s.audit[-1].action == "refused", 30
        )
        if status.stage == Stage.reverted:
            print(f"{args.task_id}: reverted ({how}) as {status.revert_sha}")
            return 0
        last = status.audit[-1] if status.audit else None
        print(f"{args.task_id}: not reverted: {last.detail if last else status.stage.value}", file=sys.stderr)
        return 1


async def cmd_status(args, settings: Settings) -> int:
    async with stack(settings) as client:
        if args.task_id:
            print_status(await service.task_status(client, args.task_id), args.json)
            return 0
        return await _list(client, args.json)


async def cmd_list(args, settings: Settings) -> int:
    async with stack(settings) as client:
        return await _list(client, args.json)


async def _list(client, as_json: bool) -> int:
    tasks = await service.list_tasks(client, limit=50)
    if as_json:
        print(json.dumps([t.model_dump(mode="json", exclude={"audit"}) for t in tasks], indent=2))
        return 0
    for t in tasks:
        print(f"{t.task_id}  {t.stage.value:<16} {t.repo:<24} {t.requester:<20} {t.text[:60]}")
    if not tasks:
        print("no tasks yet")
    return 0


async def cmd_worker(args, settings: Settings) -> int:
    from workers.main import run_worker

    client = await service.connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"worker on task queue {settings.task_queue!r}", flush=True)
    await run_worker(settings, client, stop)
    return 0


async def cmd_up(args, settings: Settings) -> int:
    from temporal.devserver import DevServer
    from workers.main import run_worker

    server = DevServer(settings)
    server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.wait_ready()
        client = await service.connect(settings)
        print(f"Temporal server 127.0.0.1:{settings.temporal_port} (history in {settings.db_file})")
        print(f"Temporal UI     {settings.ui_base}")
        print("worker running; Ctrl-C stops everything", flush=True)
        extras = []
        from triggers.slack_app import run_slack, slack_configured

        if slack_configured(settings):
            print("Slack app running", flush=True)
            extras.append(asyncio.create_task(run_slack(settings, load_config(settings), client)))
        await run_worker(settings, client, stop)
        for task in extras:
            task.cancel()
    finally:
        server.stop()
    print("stopped")
    return 0


DEMO_TASK = (
    "printf -- '- %s: retry budget raised to 3\\n' \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\" >> CHANGELOG.md && "
    "sed -i 's/^RETRIES = .*/RETRIES = 3/' app/config.py && "
    "echo 'Raised RETRIES to 3 so flaky uploads recover; noted it in CHANGELOG.md.' > \"$CONVEYOR_SUMMARY_FILE\""
)


async def cmd_demo(args, settings: Settings) -> int:
    from temporal.demo import ensure_demo_repo

    repo_path = ensure_demo_repo(settings.home / "demo" / "demo.git")
    print(f"demo repository: {repo_path}")
    args.repo, args.base, args.agent, args.approve, args.json = str(repo_path), "main", "command", True, False
    args.text = DEMO_TASK
    code = await cmd_run(args, settings)
    print(f"history kept in {settings.db_file}; `conveyor up` shows it at {settings.ui_base}")
    return code


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line too (`conveyor reject: the following arguments are required: --reason`)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="conveyor", description="Run coding agents as team infrastructure.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="embedded Temporal server + UI + worker (Ctrl-C stops)").set_defaults(func=cmd_up)
    sub.add_parser("worker", help="a worker (TEMPORAL_ADDRESS etc. via temporalio.envconfig)").set_defaults(func=cmd_worker)
    sub.add_parser("demo", help="carry the bundled demo task through every stage").set_defaults(func=cmd_demo)
    run = sub.add_parser("run", help="start a task")
    run.add_argument("--repo")
    run.add_argument("--agent")
    run.add_argument("--base")
    run.add_argument("--approve", action="store_true", help="approve as the local user and wait for the merge")
    run.add_argument("--json", action="store_true")
    run.add_argument("text")
    run.set_defaults(func=cmd_run)
    for name, func in (("approve", cmd_approve), ("cancel", cmd_cancel)):
        p = sub.add_parser(name)
        p.add_argument("task_id")
        p.set_defaults(func=func)
    reject = sub.add_parser("reject")
    reject.add_argument("task_id")
    reject.add_argument("--reason", required=True)
    reject.set_defaults(func=cmd_reject)
    revert = sub.add_parser("revert")
    revert.add_argument("task_id")
    revert.add_argument("--reason", default="")
    revert.set_defaults(func=cmd_revert)
    status = sub.add_parser("status")
    status.add_argument("task_id", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    lst = sub.add_parser("list")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    for module in PLUGINS:
        try:
            plugin = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        if hasattr(plugin, "register"):
            plugin.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if isinstance(getattr(args, "task_id", None), str):
            # a typo'd id is refused before any server is contacted (or an embedded one started)
            args.task_id = service.check_task_id(args.task_id)
        settings = Settings()
        takes_settings = args.func.__code__.co_argcount >= 2  # plugin handlers take (args) only
        result = args.func(args, settings) if takes_settings else args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except (CliError, ConfigError, service.ServiceError, ValueError) as exc:
        print(f"conveyor: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # last resort: one line, not a traceback
        if os.environ.get("CONVEYOR_DEBUG"):
            raise
        print(f"conveyor: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def entry() -> None:
    """Process entry point (`conveyor`, `python -m triggers.cli`). Skips interpreter teardown:
    the Temporal client's Rust threads can abort a finalizing interpreter (SIGABRT, "PyGILState_Release",
    temporalio/sdk-python#300), which would turn a finished command into a crash and lose its exit code."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
