"""GitHub webhook receiver: issues labeled `agent`, `/agent` comments on Conveyor PRs, CI events.

    conveyor github-webhooks --port 8787     # POST https://<public host>/github/webhooks

Every delivery is authenticated by X-Hub-Signature-256 (HMAC-SHA256 of the raw body with
GITHUB_WEBHOOK_SECRET; the receiver refuses to start without a secret) and deduplicated by
the signed body (`event_key`; X-GitHub-Delivery is not signed): the task id is derived from it,
so neither a redelivery nor a replay under a fresh delivery id starts a second task.

- `issues` labeled `agent`            -> a task on the repository (requester = the labeler's login)
- `issue_comment` `/agent ...` on a Conveyor PR (branch conveyor/<task-id>-...) -> a follow-up task
  on the same branch
- `check_suite` completed failing on the default branch, when the policy sets ci_fix_tasks
                                      -> a "fix the failing CI" task (one per broken commit)
- `status`, `check_run`, `check_suite` on a Conveyor branch -> the `checks_changed` signal to its task
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web
from temporalio.client import Client

from adapters.codehost.base import CodeHostError
from conveyor.config import ConfigError, ConveyorConfig, RepoPolicy, Settings, load_config
from conveyor.models import MAX_TASK_CHARS, Decision, Identity, Origin, TaskRequest
from triggers import service

log = logging.getLogger("conveyor.triggers.github")

MAX_BODY = 25 * 1024 * 1024
"""GitHub caps webhook payloads at 25 MB."""
BRANCH_RE = re.compile(r"^conveyor/(cv-[0-9a-f]{12})(?:-|$)")
COMMAND_RE = re.compile(r"^\s*/agent(?:\s+|$)(.*)", re.DOTALL)
CI = Identity(kind="ci", id="github", display="GitHub CI")
FAILING = {"failure", "timed_out", "startup_failure", "action_required"}


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    if not secret or not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header.removeprefix("sha256="))


def sign(secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 value GitHub sends for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event_key(body: bytes) -> str:
    """The dedupe key of a delivery: a digest of its signed body."""
    return hashlib.sha256(body).hexdigest()[:32]


def task_for_branch(branch: str) -> str | None:
    match = BRANCH_RE.match(branch or "")
    return match.group(1) if match else None


class GitHubWebhooks:
    """The webhook handler. `codehost` (a callable returning a GitHubCodeHost) is needed only to
    read a pull request's branch for `/agent` comments."""

    def __init__(self, settings: Settings, config: ConveyorConfig, client: Client, secret: str,
                 codehost: Callable[[], Any] | None = None, label: str = "agent", remember: int = 10_000):
        if not secret:
            raise ConfigError("GITHUB_WEBHOOK_SECRET is not set: refusing to accept unauthenticated webhooks")
        self.settings = settings
        self.config = config
        self.client = client
        self.secret = secret
        self.label = label
        self._codehost_factory = codehost
        self._codehost: Any = None
        self._seen: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._remember = remember

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/github/webhooks", self.handle)
        app.router.add_post("/", self.handle)
        app.router.add_get("/healthz", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not signature_ok(self.secret, body, request.headers.get("X-Hub-Signature-256")):
            log.warning("github webhook: bad or missing signature (delivery %s)", request.headers.get("X-GitHub-Delivery"))
            return web.json_response({"error": "invalid X-Hub-Signature-256"}, status=401)
        delivery = request.headers.get("X-GitHub-Delivery", "").strip()
        event = request.headers.get("X-GitHub-Event", "").strip()
        if not delivery or not event:
            return web.json_response({"error": "missing X-GitHub-Delivery or X-GitHub-Event"}, status=400)
        # Dedupe on the signed body, never on the unsigned X-GitHub-Delivery header alone: a
        # captured delivery replayed under fresh delivery ids would otherwise start a task per
        # replay (GitHub signs no timestamp). A redelivery is byte-identical, so it maps here too.
        key = event_key(body)
        if key in self._seen:
            return web.json_response({**self._seen[key], "duplicate": True})
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("payload is not an object")
        except ValueError as exc:
            return web.json_response({"error": f"invalid JSON payload: {exc}"}, status=400)
        try:
            result = await self.dispatch(event, delivery, payload, key)
        except service.Unavailable as exc:
            # Not remembered: GitHub's "Redeliver" (or its retry) can try again later.
            return web.json_response({"error": str(exc)}, status=503)
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            # a signed payload of an unexpected shape (a string where an object belongs, ...)
            log.warning("github webhook %s %s: malformed payload: %r", event, delivery, exc)
            return web.json_response({"error": f"malformed {event} payload"}, status=400)
        except CodeHostError as exc:  # reading the pull request for an /agent comment
            log.warning("github webhook %s %s: %s", event, delivery, exc)
            return web.json_response({"error": str(exc)}, status=503 if exc.retryable else 502)
        self._seen[key] = result
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        log.info("github webhook %s %s: %s", event, delivery, result)
        return web.json_response(result)

    # ---- events -------------------------------------------------------------------------

    async def dispatch(self, event: str, delivery: str, p: dict[str, Any], key: str = "") -> dict[str, Any]:
        key = key or delivery
        if event == "ping":
            return {"result": "pong"}
        policy = self._policy(p)
        if event == "issues":
            return await self.on_issue(delivery, p, policy, key)
        if event == "issue_comment":
            return await self.on_comment(delivery, p, policy, key)
        if event in ("status", "check_run", "check_suite"):
            out = await self.on_ci(event, delivery, p, policy)
            return out
        return {"result": "ignored", "detail": f"event {event!r} is not used"}

    def _policy(self, p: dict[str, Any]) -> RepoPolicy | None:
        repo = p.get("repository") or {}
        for url in (repo.get("html_url"), repo.get("clone_url")):
            if url:
                policy = self.config.repo_for_url(url)
                if policy is not None and policy.host == "github":
                    return policy
        return None

    async def on_issue(self, delivery: str, p: dict[str, Any], policy: RepoPolicy | None, key: str) -> dict[str, Any]:
        if p.get("action") != "labeled" or (p.get("label") or {}).get("name") != self.label:
            return {"result": "ignored", "detail": f"not an issue labeled {self.label!r}"}
        if policy is None:
            return _unconfigured(p)
        issue = p.get("issue") or {}
        sender = p.get("sender") or {}
        title, text = issue.get("title") or "", issue.get("body") or ""
        task_text = f"{title}\n\n{text}".strip()[:MAX_TASK_CHARS]
        origin = Origin(source="github", delivery_id=delivery, url=issue.get("html_url", ""),
                        conversation=[task_text] if task_text else [])
        return await self._start(policy, task_text, _person(sender), origin, key)

    async def on_comment(self, delivery: str, p: dict[str, Any], policy: RepoPolicy | None, key: str) -> dict[str, Any]:
        comment = p.get("comment") or {}
        issue = p.get("issue") or {}
        sender = p.get("sender") or {}
        match = COMMAND_RE.match(comment.get("body") or "")
        if p.get("action") != "created" or not match:
            return {"result": "ignored", "detail": "not an /agent comment"}
        if sender.get("type") == "Bot":
            return {"result": "ignored", "detail": "comments by bots never start tasks"}
        if not issue.get("pull_request"):
            return {"result": "ignored", "detail": "/agent comments work on Conveyor pull requests"}
        if policy is None:
            return _unconfigured(p)
        number = int(issue["number"])
        branch, base = await asyncio.to_thread(self._host().pull_branch, policy, number)
        if task_for_branch(branch) is None:
            return {"result": "ignored", "detail": f"#{number} is not a Conveyor pull request (branch {branch})"}
        origin = Origin(source="github", delivery_id=delivery, github_pr_number=number,
                        url=comment.get("html_url") or issue.get("html_url", ""))
        return await self._start(policy, match.group(1).strip(), _person(sender), origin, key, base=base,
                                 follow_up_branch=branch)

    async def on_ci(self, event: str, delivery: str, p: dict[str, Any], policy: RepoPolicy | None) -> dict[str, Any]:
        branches, sha, label = _ci_facts(event, p)
        signalled = []
        for branch in branches:
            task_id = task_for_branch(branch)
            if task_id is None:
                continue
            decision = Decision(by=CI, via="github", reason=label, head_sha=sha)
            try:
                await service.signal_task(self.client, task_id, "checks_changed", decision)
                signalled.append(task_id)
            except (service.UnknownTask, service.TaskClosed):
                continue
        if signalled:
            return {"result": "signalled", "task_ids": signalled}
        suite = p.get("check_suite") or {}
        if (event == "check_suite" and p.get("action") == "completed" and suite.get("conclusion") in FAILING
                and policy is not None):
            default = (p.get("repository") or {}).get("default_branch") or policy.base
            if suite.get("head_branch") in {default, policy.base}:
                if not policy.ci_fix_tasks:
                    return {"result": "ignored", "detail": f"CI failed on {suite.get('head_branch')}; ci_fix_tasks is off"}
                return await self._ci_fix(policy, p, suite, delivery)
        return {"result": "ignored", "detail": "no Conveyor task for this CI event"}

    async def _ci_fix(self, policy: RepoPolicy, p: dict[str, Any], suite: dict[str, Any], delivery: str) -> dict[str, Any]:
        sha = suite.get("head_sha", "")
        branch = suite.get("head_branch", policy.base)
        # head_branch is only a name: a fork PR's branch called "main" reports here too. Only a
        # failure at the current head of the real branch starts a (paid) fix task.
        head = await asyncio.to_thread(self._host().resolve_base, policy, branch)
        if head != sha:
            return {"result": "ignored", "detail": f"{sha[:12]} is not the head of {branch} ({head[:12]}): "
                                                   "a fork's branch of that name, or the branch moved on"}
        app = (suite.get("app") or {}).get("name", "CI")
        link = f"{(p.get('repository') or {}).get('html_url', '')}/commit/{sha}/checks"
        text = (f"Fix the failing CI on {branch}: the {app} check suite concluded {suite.get('conclusion')} at commit "
                f"{sha}. Find the failing checks ({link}), reproduce them and fix the cause with the smallest change.")
        # One fix task per broken commit, however many suites or redeliveries report it.
        task_id = service.task_id_for("github-ci", f"{policy.name}@{sha}")
        request = TaskRequest(task_id=task_id, repo=policy, base=branch, text=text, requester=CI,
                              origin=Origin(source="ci", delivery_id=delivery, url=link), agent=policy.agent)
        started = await service.start_task(self.client, request, self.settings)
        return {"result": "started" if started.started else "duplicate", "task_id": task_id, "ui_url": started.ui_url}

    async def _start(self, policy: RepoPolicy, text: str, requester: Identity, origin: Origin, key: str,
                     base: str | None = None, follow_up_branch: str = "") -> dict[str, Any]:
        task_id = service.task_id_for("github", key)
        # Only `github:LOGIN` (or "*") entries admit a GitHub user: a bare entry such as "U100" (a
        # Slack id) or "alice" (a local user) must not admit whoever registers that GitHub login.
        if not policy.allows("invokers", requester.principal, requester.principal):
            return {"result": "refused", "detail": f"{requester} may not start tasks on {policy.name} "
                                                   f"(invokers must name {requester.principal})"}
        try:
            request = service.build_request(policy, text, requester, origin, base=base, task_id=task_id)
        except service.Refused as exc:
            return {"result": "refused", "detail": str(exc)}
        except service.BadTask as exc:
            return {"result": "bad_task", "detail": str(exc)}
        if follow_up_branch:
            request = request.model_copy(update={"follow_up_branch": follow_up_branch})
        started = await service.start_task(self.client, request, self.settings)
        return {"result": "started" if started.started else "duplicate", "task_id": task_id, "ui_url": started.ui_url}

    def _host(self) -> Any:
        if self._codehost is None:
            if self._codehost_factory is not None:
                self._codehost = self._codehost_factory()
            else:
                from adapters.codehost.github import GitHubCodeHost

                self._codehost = GitHubCodeHost(self.settings)
        return self._codehost


def _person(sender: dict[str, Any]) -> Identity:
    login = str(sender.get("login") or "unknown")
    return Identity(kind="github", id=login, display=login)


def _unconfigured(p: dict[str, Any]) -> dict[str, Any]:
    name = (p.get("repository") or {}).get("full_name", "?")
    return {"result": "ignored", "detail": f"repository {name} is not in conveyor.toml (host = \"github\")"}


def _ci_facts(event: str, p: dict[str, Any]) -> tuple[list[str], str, str]:
    """(branches, head sha, a one-line description) of a status / check_run / check_suite event."""
    if event == "status":
        branches = [b.get("name", "") for b in p.get("branches") or []]
        return branches, p.get("sha", ""), f"status {p.get('context')}: {p.get('state')}"
    if event == "check_run":
        run = p.get("check_run") or {}
        suite = run.get("check_suite") or {}
        branches = [suite.get("head_branch") or ""]
        branches += [(pr.get("head") or {}).get("ref", "") for pr in run.get("pull_requests") or []]
        state = run.get("conclusion") or run.get("status")
        return list(dict.fromkeys(b for b in branches if b)), run.get("head_sha", ""), f"check run {run.get('name')}: {state}"
    suite = p.get("check_suite") or {}
    branches = [suite.get("head_branch") or ""]
    branches += [(pr.get("head") or {}).get("ref", "") for pr in suite.get("pull_requests") or []]
    state = suite.get("conclusion") or suite.get("status")
    return list(dict.fromkeys(b for b in branches if b)), suite.get("head_sha", ""), f"check suite: {state}"


# ---- CLI ---------------------------------------------------------------------------------


async def serve(host: str, port: int, settings: Settings | None = None) -> None:
    settings = settings or Settings()
    config = load_config(settings)
    secret = settings.github().webhook_secret
    client = await service.connect(settings)
    hooks = GitHubWebhooks(settings, config, client, secret)
    runner = web.AppRunner(hooks.app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"GitHub webhooks on http://{host}:{port}/github/webhooks ({len(config.repos)} repositories configured)")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    settings = Settings()
    if not settings.github().webhook_secret:
        print("error: set GITHUB_WEBHOOK_SECRET (the secret configured on the GitHub webhook or App)")
        return 2
    try:
        asyncio.run(serve(args.host, args.port, settings))
    except KeyboardInterrupt:
        pass
    except (ConfigError, service.ServiceError) as exc:
        print(f"error: {exc}")
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("github-webhooks", help="receive GitHub webhooks (issues, /agent comments, CI)")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (put a TLS reverse proxy in front)")
    parser.set_defaults(func=run)
