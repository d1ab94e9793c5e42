"""Conveyor's Slack app: `/agent`, `@Conveyor` mentions, review buttons, on-call revert.

Bolt's async app; every listener acks first (well inside Slack's 3 s) and does the Temporal work
afterwards, so the ack never waits on Temporal. Checks that need no I/O (grammar, repo, invoker
policy, text size) run before the ack, so their errors come back as the ack's ephemeral reply and
nothing starts. Workflow ids derive from the Slack delivery (the slash command's trigger_id, the
mention's channel+ts), so Slack's retries and double deliveries land on the same workflow.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from temporalio.client import Client

from adapters.notifier.slack import (
    APPROVE_ACTION,
    REJECT_ACTION,
    REVERT_ACTION,
    decided_blocks,
    decision_line,
    escape,
    parse_button_value,
)
from conveyor.config import ConfigError, ConveyorConfig, RepoPolicy, Settings
from conveyor.models import Decision, Identity, Origin, Stage, TaskStatus
from triggers import service
from triggers.service import ServiceError, Unavailable

log = logging.getLogger(__name__)

ClientProvider = Callable[[], Awaitable[Client]]
EVENTS_PATH = "/slack/events"
REJECT_VIEW = "conveyor_reject_view"
REASON_BLOCK = "reason"
REASON_ACTION = "reason"
MAX_CONVERSATION_MESSAGES = 50
MAX_CONVERSATION_CHARS = 12_000
DUPLICATE_WINDOW_S = 30.0

USAGE = (
    "Usage: `/agent [repo:NAME] [base:BRANCH] <task>` · `/agent status <task-id>` · "
    "`/agent list` · `/agent revert <task-id> [reason]`"
)

_TASK_ID = r"cv-[0-9a-f]{12}"
_OPTION_RE = re.compile(r"^(repo|base|agent):(\S+)$")


class UserError(Exception):
    """Shown to the user as an ephemeral message; nothing was started."""


# ---- parsing --------------------------------------------------------------------------------------


def slack_unescape(text: str) -> str:
    """Slack sends `<`, `>`, `&` HTML-escaped and links/mentions as `<...>` entities."""

    def entity(match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner.startswith(("@", "#", "!")):
            return f"<{inner}>"  # mentions stay recognisable
        return inner.split("|", 1)[0]  # <https://x|label> -> https://x

    return html.unescape(re.sub(r"<([^<>]+)>", entity, text))


@dataclass
class Command:
    verb: str  # task | status | list | revert | help
    text: str = ""
    repo: str = ""
    base: str = ""
    agent: str = ""
    task_id: str = ""
    reason: str = ""


def parse_command(raw: str) -> Command:
    text = slack_unescape(raw).strip()
    words = text.split()
    if not words:
        raise UserError(f"The task is empty: say what the agent should do.\n{USAGE}")
    first = words[0].lower()
    if first == "help" and len(words) == 1:
        return Command("help")
    if first == "list" and len(words) == 1:
        return Command("list")
    if first in ("status", "revert") and len(words) >= 2 and re.fullmatch(_TASK_ID, words[1]):
        rest = text.split(None, 2)
        return Command(first, task_id=words[1], reason=rest[2].strip() if len(rest) > 2 else "")
    if first in ("status", "revert") and len(words) == 1:
        raise UserError(f"`{first}` needs a task id (they look like cv-1a2b3c4d5e6f).\n{USAGE}")
    cmd = Command("task")
    # leading repo:/base:/agent: options, then the task text verbatim (it may be a shell command)
    rest = text
    while True:
        parts = rest.split(None, 1)
        if not parts:
            rest = ""
            break
        match = _OPTION_RE.match(parts[0])
        if not match:
            break
        setattr(cmd, match.group(1), match.group(2))
        rest = parts[1] if len(parts) > 1 else ""
    cmd.text = rest.strip()
    return cmd


def strip_mention(text: str, bot_user_id: str) -> str:
    return re.sub(rf"<@{re.escape(bot_user_id)}(\|[^>]*)?>", "", text, count=1).strip() if bot_user_id else text


# ---- the app --------------------------------------------------------------------------------------


class SlackTrigger:
    """State shared by the listeners: config, the Temporal client provider, dedupe memory."""

    def __init__(self, settings: Settings, config: ConveyorConfig, client_provider: ClientProvider) -> None:
        self.settings = settings
        self.config = config
        self.client_provider = client_provider
        # In-process memory of deliveries being handled, so a retry arriving while the first
        # attempt is still starting does not post a second thread root. Temporal's workflow-id
        # uniqueness is the real guarantee across processes.
        self._inflight: dict[str, float] = {}
        self._recent: dict[tuple[str, str, str], tuple[float, str]] = {}
        self.bot_user_id = ""

    # -- policy ------------------------------------------------------------------------------------

    def resolve_repo(self, name: str, channel: str) -> RepoPolicy:
        if name:
            try:
                return self.config.repo(name)
            except ConfigError as exc:
                raise UserError(f"Unknown repository `{escape(name)}`. {escape(str(exc).split('(', 1)[-1].rstrip(')')).capitalize()}.") from None
        policy = self.config.repo_for_channel(channel)
        if policy is not None:
            return policy
        if len(self.config.repos) == 1:
            return next(iter(self.config.repos.values()))
        known = ", ".join(f"`{n}`" for n in sorted(self.config.repos)) or "none configured"
        raise UserError(f"This channel has no default repository: add `repo:NAME` (known: {known}).")

    def prepare(self, cmd: Command, user: Identity, origin: Origin, task_id: str):
        """All checks that need no I/O. Raises UserError / ServiceError with the user's message."""
        repo = self.resolve_repo(cmd.repo, origin.slack_channel)
        if not cmd.text:
            raise UserError(f"The task is empty: say what the agent should do.\n{USAGE}")
        return service.build_request(repo, cmd.text, user, origin, base=cmd.base or None, agent=cmd.agent or None, task_id=task_id)

    def policy_for(self, status: TaskStatus) -> RepoPolicy | None:
        return self.config.repos.get(status.repo)

    def check_decider(self, status: TaskStatus, user: Identity, role: str) -> str | None:
        """Why `user` may not act on this task, or None. The workflow checks again (it has the
        policy snapshotted at start); this is for a clear answer in Slack."""
        policy = self.policy_for(status)
        if policy is None:
            return None  # not one of ours (e.g. an ad-hoc CLI repo): the workflow decides
        if not policy.allows(role, user.principal, user.id):  # type: ignore[arg-type]
            noun = {"approvers": "approve or reject", "reverters": "revert"}[role]
            return f"You are not allowed to {noun} tasks on `{escape(policy.name)}`; nothing was sent."
        if role == "approvers" and policy.approver_must_differ and status.requester in (user.principal, user.id):
            return f"`{escape(policy.name)}` requires a reviewer other than the requester; nothing was sent."
        return None

    def check_reader(self, status: TaskStatus, user: Identity) -> str | None:
        """Why `user` may not see this task's status, or None. Status carries the task text, the
        requester and the audit trail: only its requester and people with a role on its repository
        see it (anyone else in the workspace, or an external member of a shared channel, does not)."""
        if status.requester in (user.principal, user.id):
            return None
        policy = self.policy_for(status)
        if policy is not None and any(policy.allows(r, user.principal, user.id) for r in ("invokers", "approvers", "reverters")):  # type: ignore[arg-type]
            return None
        return f"Task `{status.task_id}` is not visible to you: you have no role on its repository."

    async def client(self) -> Client:
        try:
            return await self.client_provider()
        except Unavailable:
            raise
        except Exception as exc:  # connect failures from custom providers
            raise Unavailable(f"Temporal is not reachable: {exc}") from exc

    def claim(self, key: str) -> bool:
        now = time.monotonic()
        for k, at in list(self._inflight.items()):
            if now - at > 600:
                del self._inflight[k]
        if key in self._inflight:
            return False
        self._inflight[key] = now
        return True

    def recent_duplicate(self, user: str, channel: str, text: str) -> str:
        """Task id of the same user's same text in the same channel within the window, or ''.
        Catches a double submission (the command typed twice) which Slack delivers with two
        different trigger ids."""
        now = time.monotonic()
        for k, (at, _) in list(self._recent.items()):
            if now - at > DUPLICATE_WINDOW_S:
                del self._recent[k]
        hit = self._recent.get((user, channel, text.strip()))
        return hit[1] if hit else ""

    def remember(self, user: str, channel: str, text: str, task_id: str) -> None:
        self._recent[(user, channel, text.strip())] = (time.monotonic(), task_id)

    async def queue_position(self, client: Client, task_id: str) -> int:
        """How many other tasks are waiting for a worker (ahead of this one); 0 when unknown."""
        query = (
            f"WorkflowType = '{service.TASK_WORKFLOW}' AND ExecutionStatus = 'Running' "
            f"AND TaskQueue = '{self.settings.task_queue}' AND ConveyorStage = '{Stage.received.value}' "
            f"AND WorkflowId != '{task_id}'"
        )
        try:
            count = await asyncio.wait_for(client.count_workflows(query), timeout=0.5)
            return int(count.count)  # visibility is eventually consistent: this one may not be in it yet
        except Exception:  # search attributes missing, visibility lag: the position is a nicety
            return 0

    # -- replies -------------------------------------------------------------------------------------

    @staticmethod
    async def ephemeral(api: AsyncWebClient, channel: str, user: str, text: str, thread_ts: str = "") -> None:
        try:
            kwargs: dict[str, Any] = {"channel": channel, "user": user, "text": text}
            if thread_ts:
                kwargs["thread_ts"] = thread_ts
            await api.chat_postEphemeral(**kwargs)
        except SlackApiError as exc:
            log.warning("could not post an ephemeral message: %s", exc.response.get("error"))

    def accepted_text(self, task_id: str, ui_url: str, ahead: int, user: str) -> str:
        text = f":white_check_mark: <@{user}> accepted as task `{task_id}` · <{ui_url}|Temporal UI>"
        if ahead > 0:
            text += f"\n:hourglass: {ahead} task{'s' if ahead > 1 else ''} ahead in the queue"
        text += f"\nProgress appears below. `/agent status {task_id}` any time."
        return text


def identity_from(user: dict[str, Any] | str, name: str = "") -> Identity:
    if isinstance(user, dict):
        return Identity(kind="slack", id=user["id"], display=user.get("username") or user.get("name") or name)
    return Identity(kind="slack", id=user, display=name)


def render_status(status: TaskStatus, ui_url: str) -> str:
    lines = [
        f"*`{status.task_id}`* on *{escape(status.repo)}* ({escape(status.base)}) — *{status.stage.value.replace('_', ' ')}*",
        f"> {escape(status.text[:300])}",
        f"Requested by {escape(status.requester)} via {escape(status.source)}",
    ]
    if status.change_url:
        lines.append(f"Change: <{status.change_url}|{escape(status.branch or status.change_url)}>")
    if status.merge_sha:
        lines.append(f"Merged as `{status.merge_sha[:12]}`")
    if status.revert_sha:
        lines.append(f"Reverted by `{status.revert_sha[:12]}`")
    if status.detail:
        lines.append(escape(status.detail[:500]))
    for event in status.audit[-5:]:
        lines.append(f"• {event.at:%H:%M:%S} {escape(event.action)} {escape(event.by)} {escape(event.detail[:120])}".rstrip())
    lines.append(f"<{ui_url}|Temporal UI>")
    return "\n".join(lines)


async def list_text(client: Client, user: Identity, settings: Settings, limit: int = 20) -> str:
    """The user's recent tasks from Temporal visibility alone (search attributes), so the answer
    is fast and never waits on a query to a busy or absent worker."""
    from conveyor import search

    safe = user.principal.replace("'", "")
    query = f"WorkflowType = '{service.TASK_WORKFLOW}' AND {search.REQUESTER.name} = '{safe}'"
    lines: list[str] = []
    try:
        async for wf in client.list_workflows(query, limit=limit):
            attrs = wf.typed_search_attributes
            stage = attrs.get(search.STAGE) or "?"
            repo = attrs.get(search.REPO) or "?"
            state = "" if wf.status is None or wf.status.name == "RUNNING" else f" ({wf.status.name.lower()})"
            lines.append(
                f"• <{settings.task_ui_url(wf.id)}|`{wf.id}`> {escape(repo)} — *{stage.replace('_', ' ')}*{state}"
                f" — started {wf.start_time:%Y-%m-%d %H:%M} UTC"
            )
    except Exception as exc:
        raise Unavailable(f"could not list tasks: {exc}") from exc
    return ("*Your tasks*\n" + "\n".join(lines)) if lines else "You have no Conveyor tasks yet."


def build_app(
    settings: Settings,
    config: ConveyorConfig,
    client_provider: ClientProvider,
    *,
    web_client: AsyncWebClient | None = None,
) -> AsyncApp:
    """The bolt app with every listener registered. Signature verification is always on."""
    slack = settings.slack()
    if not slack.signing_secret and not slack.app_token:
        raise ConfigError("SLACK_SIGNING_SECRET is not set: the Slack app refuses to run without request signing")
    if not slack.bot_token and web_client is None:
        raise ConfigError("SLACK_BOT_TOKEN is not set")
    if web_client is None:
        kwargs: dict[str, Any] = {"token": slack.bot_token}
        if slack.api_url:
            kwargs["base_url"] = slack.api_url if slack.api_url.endswith("/") else slack.api_url + "/"
        web_client = AsyncWebClient(**kwargs)
    app = AsyncApp(
        client=web_client,
        signing_secret=slack.signing_secret or None,
        # Every listener is an instant, I/O-free ack function plus lazy work, so answering
        # after the ack function returns costs nothing and skips bolt's 10 ms ack polling loop.
        process_before_response=True,
        request_verification_enabled=bool(slack.signing_secret),
    )
    trigger = SlackTrigger(settings, config, client_provider)
    app._conveyor = trigger  # type: ignore[attr-defined]  # reachable from tests and `up`

    async def ack_only(ack) -> None:
        await ack()

    # ---------------- /agent ----------------

    async def ack_agent(ack, command: dict[str, Any]) -> None:
        try:
            cmd = parse_command(command.get("text", ""))
            if cmd.verb == "help":
                await ack(text=USAGE, response_type="ephemeral")
                return
            if cmd.verb == "task":
                user = identity_from(command["user_id"], command.get("user_name", ""))
                origin = Origin(source="slack", delivery_id=command["trigger_id"], slack_channel=command["channel_id"])
                trigger.prepare(cmd, user, origin, service.task_id_for("slack", command["trigger_id"]))
        except (UserError, ServiceError) as exc:
            await ack(text=f":x: {exc}", response_type="ephemeral")
            return
        await ack()

    async def run_agent(command: dict[str, Any], client: AsyncWebClient, respond) -> None:
        try:
            cmd = parse_command(command.get("text", ""))
        except UserError:
            return  # already answered in the ack
        user = identity_from(command["user_id"], command.get("user_name", ""))
        try:
            if cmd.verb == "task":
                await start_from_command(cmd, user, command, client, respond)
            elif cmd.verb == "status":
                tc = await trigger.client()
                status = await service.task_status(tc, cmd.task_id)
                text = (f":no_entry: {why}" if (why := trigger.check_reader(status, user))
                        else render_status(status, settings.task_ui_url(cmd.task_id)))
                await respond(response_type="ephemeral", replace_original=False, text=text)
            elif cmd.verb == "list":
                text = await list_text(await trigger.client(), user, settings)
                await respond(response_type="ephemeral", replace_original=False, text=text)
            elif cmd.verb == "revert":
                await do_revert(cmd.task_id, cmd.reason, user, command["channel_id"], client, respond)
        except Unavailable as exc:
            await respond(response_type="ephemeral", replace_original=False,
                          text=f":warning: Conveyor cannot reach Temporal right now, so nothing was started or sent. Please retry in a minute. ({escape(str(exc))[:300]})")
        except (ServiceError, UserError) as exc:
            await respond(response_type="ephemeral", replace_original=False, text=f":x: {escape(str(exc))}")

    async def start_from_command(cmd: Command, user: Identity, command: dict[str, Any], client: AsyncWebClient, respond) -> None:
        channel, trigger_id = command["channel_id"], command["trigger_id"]
        task_id = service.task_id_for("slack", trigger_id)
        try:
            trigger.prepare(cmd, user, Origin(source="slack", delivery_id=trigger_id, slack_channel=channel), task_id)
        except (UserError, ServiceError):
            return  # the ack already told the user; nothing starts
        if not trigger.claim(task_id):
            return  # the same delivery is being handled right now
        if dup := trigger.recent_duplicate(user.id, channel, cmd.text):
            await respond(response_type="ephemeral", replace_original=False,
                          text=f"You just asked for the same thing: it is task `{dup}`. Nothing new was started.")
            return
        tc = await trigger.client()  # Unavailable here: nothing posted, nothing started
        root_text = f"<@{user.id}> asked Conveyor: {escape(cmd.text[:2800])}"
        try:
            root = await client.chat_postMessage(channel=channel, text=root_text, unfurl_links=False)
        except SlackApiError as exc:
            err = exc.response.get("error")
            hint = " Invite @Conveyor to this channel first." if err in ("not_in_channel", "channel_not_found") else ""
            await respond(response_type="ephemeral", replace_original=False, text=f":x: Slack refused the thread ({err}).{hint} Nothing was started.")
            return
        thread_ts = str(root["ts"])
        origin = Origin(source="slack", delivery_id=trigger_id, slack_channel=channel, slack_thread_ts=thread_ts,
                        slack_response_url=command.get("response_url", ""))
        request = trigger.prepare(cmd, user, origin, task_id)
        try:
            result = await service.start_task(tc, request, settings)
        except BaseException:
            # nothing half-started: the thread root goes away with the failed start
            await _quiet_delete(client, channel, thread_ts)
            raise
        if not result.started:
            await _quiet_delete(client, channel, thread_ts)
            await respond(response_type="ephemeral", replace_original=False, text=f"Task `{task_id}` was already started; nothing new was started.")
            return
        trigger.remember(user.id, channel, cmd.text, task_id)
        ahead = await trigger.queue_position(tc, task_id)
        await client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=trigger.accepted_text(task_id, result.ui_url, ahead, user.id))

    app.command("/agent")(ack=ack_agent, lazy=[run_agent])

    # ---------------- @Conveyor mentions ----------------

    async def on_mention(event: dict[str, Any], client: AsyncWebClient, context) -> None:
        channel, user_id, ts = event.get("channel", ""), event.get("user", ""), event.get("ts", "")
        if not (channel and user_id and ts) or event.get("bot_id"):
            return
        thread_ts = event.get("thread_ts") or ts
        bot_user_id = context.get("bot_user_id") or trigger.bot_user_id
        raw = strip_mention(event.get("text", ""), bot_user_id)
        task_id = service.task_id_for("slack", f"{channel}:{ts}")
        if not trigger.claim(task_id):
            return  # a Slack retry of a delivery we are already handling
        try:
            cmd = parse_command(raw)
            if cmd.verb in ("help",):
                await trigger.ephemeral(client, channel, user_id, USAGE, thread_ts)
                return
            user = Identity(kind="slack", id=user_id, display=await _display_name(client, user_id))
            if cmd.verb != "task":
                text = await other_verb(cmd, user, channel, client)
                await trigger.ephemeral(client, channel, user_id, text, thread_ts)
                return
            origin = Origin(source="slack", delivery_id=f"{channel}:{ts}", slack_channel=channel, slack_thread_ts=thread_ts)
            trigger.prepare(cmd, user, origin, task_id)  # refuse before any I/O
            tc = await trigger.client()
            if event.get("thread_ts"):
                origin.conversation = await _conversation(client, channel, thread_ts, ts, bot_user_id)
            request = trigger.prepare(cmd, user, origin, task_id)
            result = await service.start_task(tc, request, settings)
            if not result.started:
                return  # Slack retried a delivery whose task already runs: it already has its reply
            ahead = await trigger.queue_position(tc, task_id)
            await client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=trigger.accepted_text(task_id, result.ui_url, ahead, user_id))
        except Unavailable as exc:
            trigger._inflight.pop(task_id, None)  # let the user's retry (or Slack's) try again
            await trigger.ephemeral(client, channel, user_id, f":warning: Conveyor cannot reach Temporal right now, so nothing was started. Please retry in a minute. ({escape(str(exc))[:300]})", thread_ts)
        except (UserError, ServiceError) as exc:
            await trigger.ephemeral(client, channel, user_id, f":x: {escape(str(exc)) if isinstance(exc, ServiceError) else exc}", thread_ts)

    app.event("app_mention")(ack=ack_only, lazy=[on_mention])

    async def other_verb(cmd: Command, user: Identity, channel: str, client: AsyncWebClient) -> str:
        tc = await trigger.client()
        if cmd.verb == "status":
            status = await service.task_status(tc, cmd.task_id)
            if why := trigger.check_reader(status, user):
                return f":no_entry: {why}"
            return render_status(status, settings.task_ui_url(cmd.task_id))
        if cmd.verb == "list":
            return await list_text(tc, user, settings)
        if cmd.verb == "revert":
            answers: list[str] = []

            async def collect(text: str = "", **_: Any) -> None:
                answers.append(text)

            await do_revert(cmd.task_id, cmd.reason, user, channel, client, collect)
            return "\n".join(answers)
        return USAGE

    # ---------------- revert (command, mention, button) ----------------

    async def do_revert(task_id: str, reason: str, user: Identity, channel: str, client: AsyncWebClient, respond) -> None:
        tc = await trigger.client()
        status = await service.task_status(tc, task_id)
        if why := trigger.check_decider(status, user, "reverters"):
            await respond(response_type="ephemeral", replace_original=False, text=f":no_entry: {why}")
            return
        # On-call reverts land at once (emergency); a code host with review then skips the revert PR's review.
        decision = Decision(by=user, via=f"slack:{channel}", reason=reason or "reverted from Slack", emergency=True)
        outcome = await service.revert_task(tc, task_id, decision, settings)
        verb = {"signalled": "Revert requested", "started": "Revert started", "already": "A revert is already under way"}.get(outcome, outcome)
        await respond(response_type="ephemeral", replace_original=False,
                      text=f":rewind: {verb} for `{task_id}`. The revert commit's link will appear in the task's thread.")
        thread = await _task_thread(tc, task_id)
        if thread and outcome != "already":
            with _suppress_slack():
                await client.chat_postMessage(channel=thread[0], thread_ts=thread[1],
                                              text=f":rewind: <@{user.id}> asked to revert `{task_id}`" + (f": {escape(reason)}" if reason else ""))

    # ---------------- review buttons ----------------

    async def clicked(body: dict[str, Any], action: dict[str, Any], respond, role: str, what: str):
        """Who clicked a review button, on which task: (user, channel, task_id, head_sha, temporal
        client, status), or None after telling the clicker why nothing happens."""
        user = identity_from(body["user"])
        channel = (body.get("channel") or {}).get("id") or body["container"].get("channel_id", "")
        try:
            task_id, head_sha = parse_button_value(action.get("value", ""))
            tc = await trigger.client()
            status = await service.task_status(tc, task_id)
        except Unavailable as exc:
            await respond(response_type="ephemeral", replace_original=False, text=f":warning: Temporal is unreachable; your {what} was not sent. Please retry. ({escape(str(exc))[:200]})")
            return None
        except (ServiceError, ValueError) as exc:
            await respond(response_type="ephemeral", replace_original=False, text=f":x: {escape(str(exc))}")
            return None
        if why := trigger.check_decider(status, user, role):
            await respond(response_type="ephemeral", replace_original=False, text=f":no_entry: {why}")
            return None
        return user, channel, task_id, head_sha, tc, status

    async def on_approve(body: dict[str, Any], action: dict[str, Any], client: AsyncWebClient, respond) -> None:
        if (click := await clicked(body, action, respond, "approvers", "approval")) is None:
            return
        user, channel, task_id, head_sha, tc, status = click
        if status.stage != Stage.awaiting_review:
            await respond(response_type="ephemeral", replace_original=False,
                          text=f"Task `{task_id}` is {status.stage.value.replace('_', ' ')}, not awaiting review; nothing was sent.")
            return
        if status.head_sha and not head_sha:
            # Our review buttons always name the head they show; without one the workflow would
            # approve whatever the head is now, which nobody reviewed.
            await respond(response_type="ephemeral", replace_original=False,
                          text=f"This button names no reviewed head of `{task_id}`; approve from its review message. Nothing was sent.")
            return
        if head_sha and status.head_sha and head_sha != status.head_sha:
            await respond(response_type="ephemeral", replace_original=False,
                          text=f"The change moved since this message (now `{status.head_sha[:12]}`); review the new head. Nothing was sent.")
            return
        try:
            await service.signal_task(tc, task_id, "approve", Decision(by=user, via=f"slack:{channel}", head_sha=head_sha))
        except Unavailable as exc:
            await respond(response_type="ephemeral", replace_original=False, text=f":warning: Temporal is unreachable; your approval was not sent. Please retry. ({escape(str(exc))[:200]})")
            return
        except ServiceError as exc:
            await respond(response_type="ephemeral", replace_original=False, text=f":x: {escape(str(exc))}")
            return
        await _mark_decided(client, channel, body, decision_line("approve", user.principal))

    async def on_reject_click(body: dict[str, Any], action: dict[str, Any], client: AsyncWebClient, respond) -> None:
        if (click := await clicked(body, action, respond, "approvers", "rejection")) is None:
            return
        user, channel, task_id, head_sha, _tc, _status = click
        message = body.get("message") or {}
        meta = {"task_id": task_id, "head_sha": head_sha, "channel": channel,
                "message_ts": body.get("container", {}).get("message_ts", "") or message.get("ts", ""),
                "thread_ts": message.get("thread_ts", "") or body.get("container", {}).get("thread_ts", "")}
        try:
            await client.views_open(trigger_id=body["trigger_id"], view=reject_modal(task_id, json.dumps(meta)))
        except SlackApiError as exc:  # expired_trigger_id: Slack allows 3 s between the click and the modal
            await respond(response_type="ephemeral", replace_original=False,
                          text=f":warning: Slack did not open the reason dialog ({exc.response.get('error')}); please click Reject again.")

    async def ack_reject_view(ack, view: dict[str, Any]) -> None:
        reason = _reason_of(view)
        if not reason:
            await ack(response_action="errors", errors={REASON_BLOCK: "Please say why: the requester sees this reason."})
            return
        await ack()

    async def on_reject_view(body: dict[str, Any], view: dict[str, Any], client: AsyncWebClient) -> None:
        reason = _reason_of(view)
        if not reason:
            return
        meta = json.loads(view.get("private_metadata") or "{}")
        user = identity_from(body["user"])
        channel, task_id = meta.get("channel", ""), meta.get("task_id", "")
        try:
            tc = await trigger.client()
            status = await service.task_status(tc, task_id)
            if why := trigger.check_decider(status, user, "approvers"):
                await trigger.ephemeral(client, channel, user.id, f":no_entry: {why}")
                return
            await service.signal_task(tc, task_id, "reject", Decision(by=user, via=f"slack:{channel}", reason=reason, head_sha=meta.get("head_sha", "")))
        except Unavailable as exc:
            await trigger.ephemeral(client, channel, user.id, f":warning: Temporal is unreachable; your rejection was not sent. Please retry. ({escape(str(exc))[:200]})")
            return
        except ServiceError as exc:
            await trigger.ephemeral(client, channel, user.id, f":x: {escape(str(exc))}")
            return
        if meta.get("message_ts"):
            await _mark_decided(client, channel, None, decision_line("reject", user.principal, reason), ts=meta["message_ts"],
                                thread_ts=meta.get("thread_ts", ""))

    async def on_revert_click(body: dict[str, Any], action: dict[str, Any], client: AsyncWebClient, respond) -> None:
        user = identity_from(body["user"])
        channel = (body.get("channel") or {}).get("id") or body["container"].get("channel_id", "")
        try:
            task_id, _ = parse_button_value(action.get("value", ""))
            await do_revert(task_id, "", user, channel, client, respond)
        except Unavailable as exc:
            await respond(response_type="ephemeral", replace_original=False, text=f":warning: Temporal is unreachable; nothing was reverted. Please retry. ({escape(str(exc))[:200]})")
        except (ServiceError, ValueError) as exc:
            await respond(response_type="ephemeral", replace_original=False, text=f":x: {escape(str(exc))}")

    app.action(APPROVE_ACTION)(ack=ack_only, lazy=[on_approve])
    app.action(REJECT_ACTION)(ack=ack_only, lazy=[on_reject_click])
    app.action(REVERT_ACTION)(ack=ack_only, lazy=[on_revert_click])
    app.view(REJECT_VIEW)(ack=ack_reject_view, lazy=[on_reject_view])

    async def _task_thread(tc: Client, task_id: str) -> tuple[str, str] | None:
        """(channel, thread_ts) of a Slack-started task, read from its start input."""
        try:
            handle = tc.get_workflow_handle(task_id)
            async for event in handle.fetch_history_events():
                attrs = event.workflow_execution_started_event_attributes
                if attrs and attrs.input.payloads:
                    data = json.loads(attrs.input.payloads[0].data)
                    origin = data.get("origin") or {}
                    if origin.get("slack_channel") and origin.get("slack_thread_ts"):
                        return origin["slack_channel"], origin["slack_thread_ts"]
                break
        except Exception as exc:  # the thread line is a nicety
            log.debug("no thread for %s: %s", task_id, exc)
        return None

    return app


def reject_modal(task_id: str, private_metadata: str) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": REJECT_VIEW,
        "private_metadata": private_metadata,
        "title": {"type": "plain_text", "text": "Reject change"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"Rejecting task `{task_id}`. The change will be closed."}},
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "label": {"type": "plain_text", "text": "Reason"},
                "element": {"type": "plain_text_input", "action_id": REASON_ACTION, "multiline": True, "max_length": 2000},
            },
        ],
    }


def _reason_of(view: dict[str, Any]) -> str:
    values = (view.get("state") or {}).get("values") or {}
    value = ((values.get(REASON_BLOCK) or {}).get(REASON_ACTION) or {}).get("value") or ""
    return value.strip()


class _suppress_slack:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, SlackApiError):
            log.warning("Slack call failed: %s", exc.response.get("error"))
            return True
        return False


async def _quiet_delete(client: AsyncWebClient, channel: str, ts: str) -> None:
    try:
        await client.chat_delete(channel=channel, ts=ts)
    except Exception as exc:
        log.warning("could not delete message %s: %s", ts, exc)


async def _mark_decided(client: AsyncWebClient, channel: str, body: dict[str, Any] | None, line: str, ts: str = "",
                        thread_ts: str = "") -> None:
    """The review message shows who decided and loses its buttons at once (the notifier repeats
    this durably when the workflow reports the outcome)."""
    message = (body or {}).get("message") or {}
    ts = ts or message.get("ts") or (body or {}).get("container", {}).get("message_ts", "")
    if not ts:
        return
    blocks = message.get("blocks")
    if blocks is None:
        try:
            # the review message is a thread reply: read its thread and pick it out
            resp = await client.conversations_replies(channel=channel, ts=thread_ts or ts, limit=200)
            for msg in resp.get("messages", []):
                if msg.get("ts") == ts:
                    blocks = msg.get("blocks") or []
        except SlackApiError:
            pass
        if blocks is None:
            return  # never replace a review message we cannot read; the notifier updates it later
    with _suppress_slack():
        await client.chat_update(channel=channel, ts=ts, text=line, blocks=decided_blocks(blocks or [], line))


async def _display_name(client: AsyncWebClient, user_id: str) -> str:
    try:
        resp = await client.users_info(user=user_id)
        user = resp.get("user") or {}
        return (user.get("profile") or {}).get("display_name") or user.get("real_name") or user.get("name") or ""
    except Exception:  # users:read missing: the id is enough
        return ""


async def _conversation(client: AsyncWebClient, channel: str, thread_ts: str, upto_ts: str, bot_user_id: str) -> list[str]:
    """The thread's earlier messages, oldest first, bounded: they become the task's context."""
    try:
        resp = await client.conversations_replies(channel=channel, ts=thread_ts, limit=200)
    except SlackApiError as exc:
        log.warning("conversations.replies failed: %s", exc.response.get("error"))
        return []
    out: list[str] = []
    for msg in resp.get("messages", []):
        if msg.get("ts") == upto_ts:
            break
        if msg.get("bot_id") or msg.get("user") == bot_user_id:
            continue  # our own progress messages are not context
        out.append(f"<@{msg.get('user', '?')}>: {slack_unescape(msg.get('text', ''))}")
    out = out[-MAX_CONVERSATION_MESSAGES:]
    while out and sum(map(len, out)) > MAX_CONVERSATION_CHARS:
        out.pop(0)  # keep the newest messages
    return out


# ---- serving --------------------------------------------------------------------------------------


def lazy_client_provider(settings: Settings) -> ClientProvider:
    """Connect on first use and keep the client; a failed connect raises Unavailable and the next
    request tries again (so the Slack app can start before Temporal does)."""
    cached: dict[str, Client] = {}
    lock = asyncio.Lock()

    async def provide() -> Client:
        if "c" in cached:
            return cached["c"]
        async with lock:
            if "c" not in cached:
                cached["c"] = await service.connect(settings)
            return cached["c"]

    return provide


def web_app(app: AsyncApp, path: str = EVENTS_PATH) -> web.Application:
    """aiohttp application: POST `path` (events, commands, interactivity), GET /healthz."""

    async def events(request: web.Request) -> web.Response:
        bolt_resp = await app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(bolt_resp)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    webapp = web.Application()
    webapp.router.add_post(path, events)
    webapp.router.add_get("/healthz", healthz)
    return webapp


async def serve_http(app: AsyncApp, port: int, host: str = "0.0.0.0", path: str = EVENTS_PATH) -> web.AppRunner:
    """Start serving; returns the runner (call `await runner.cleanup()` to stop)."""
    trigger = getattr(app, "_conveyor", None)
    if trigger is not None and not trigger.settings.slack().signing_secret:
        raise ConfigError("SLACK_SIGNING_SECRET is not set: HTTP mode never serves unsigned requests")
    runner = web.AppRunner(web_app(app, path), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server and server.sockets:
            return server.sockets[0].getsockname()[1]
    raise RuntimeError("not serving")


def slack_configured(settings: Settings) -> bool:
    slack = settings.slack()
    return bool(slack.bot_token and (slack.signing_secret or slack.app_token))


async def run_slack(settings: Settings, config: ConveyorConfig, client: Client | None = None, port: int | None = None,
                    host: str = "0.0.0.0") -> None:
    """Run until cancelled: Socket Mode when SLACK_APP_TOKEN is set, else HTTP on `port`
    (default CONVEYOR_SLACK_PORT, else 3000)."""
    port = port if port is not None else int(os.environ.get("CONVEYOR_SLACK_PORT", "3000"))
    provider: ClientProvider
    if client is not None:
        async def provider() -> Client:
            return client
    else:
        provider = lazy_client_provider(settings)
    app = build_app(settings, config, provider)
    slack = settings.slack()
    if slack.app_token:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        # app.client carries SLACK_API_URL, so apps.connections.open goes through the same base
        handler = AsyncSocketModeHandler(app, slack.app_token)
        log.info("Slack app connected in Socket Mode")
        try:
            await handler.start_async()
        finally:
            await handler.close_async()
        return
    runner = await serve_http(app, port, host)
    log.info("Slack app listening on http://%s:%s%s", host, port, EVENTS_PATH)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# ---- CLI --------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "slack",
        help="run the Slack app (Socket Mode when SLACK_APP_TOKEN is set, else HTTP on --port)",
        description="Serve /agent, @Conveyor mentions and the review buttons. HTTP mode serves "
        f"POST {EVENTS_PATH} (point the slash command, event subscriptions and interactivity there).",
    )
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default CONVEYOR_SLACK_PORT or 3000; unused in Socket Mode)")
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    parser.set_defaults(func=_cli_slack)
    return parser


def _cli_slack(args: argparse.Namespace) -> int:
    import sys

    from conveyor.config import load_config

    settings = Settings()
    try:
        config = load_config(settings)
        if not slack_configured(settings):
            raise ConfigError("Slack is not configured: set SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (or SLACK_APP_TOKEN for Socket Mode)")
        if not config.repos:
            raise ConfigError("no repositories configured: add [repos.NAME] tables to conveyor.toml")
        asyncio.run(run_slack(settings, config, port=args.port, host=args.host))
    except ConfigError as exc:
        print(f"conveyor slack: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
