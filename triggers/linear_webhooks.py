"""Linear webhook receiver: an issue labeled `agent` (LinearSettings.label) becomes a task.

Checks, in order: body size, `Linear-Signature` (hex HMAC-SHA256 of the raw body with
LINEAR_WEBHOOK_SECRET; fails closed when no secret is configured), `webhookTimestamp` within
60 s of now (replays), then dedupe by the signed event (`event_key`: the body minus its
per-delivery fields; the unsigned `Linear-Delivery` header is only logged): the task id is
task_id_for("linear", key), so neither a redelivery nor a replay can start a second workflow.
Only the moment the label is added counts (an issue created with it, or an update whose
`updatedFrom.labelIds` lacked it): editing a labeled issue starts nothing.
The repository is the one whose policy has `linear_team` = the issue's team key (or id).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from conveyor.config import ConveyorConfig, RepoPolicy, Settings, load_config
from conveyor.models import MAX_TASK_CHARS, Identity, Origin, TaskRequest

log = logging.getLogger("conveyor.linear")

MAX_BODY_BYTES = 1024 * 1024
TIMESTAMP_WINDOW_S = 60
_SEEN_MAX = 10_000

Starter = Callable[[TaskRequest], Awaitable[Any]]
"""Starts a task; returns something with `task_id` and `started` (service.StartResult)."""


def verify_signature(secret: str, raw: bytes, signature: str) -> bool:
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, (signature or "").strip().lower())


def event_key(payload: dict[str, Any]) -> str:
    """Dedupe key from the SIGNED body: the event minus the per-delivery fields. The
    `Linear-Delivery` header is not covered by the signature, so keying on it let anyone who saw
    one signed delivery replay it (inside the timestamp window) under fresh delivery ids and start
    a task per replay. A retry of the same event carries the same data, so it maps to one key."""
    stable = {k: v for k, v in payload.items() if k not in ("webhookTimestamp", "webhookId")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def repo_for_team(config: ConveyorConfig, team: dict[str, Any], team_id: str) -> RepoPolicy | None:
    keys = {str(v) for v in (team.get("key"), team.get("id"), team.get("name"), team_id) if v}
    matches = [p for p in config.repos.values() if p.linear_team and p.linear_team in keys]
    return sorted(matches, key=lambda p: p.name)[0] if matches else None


def requester_for(repo: RepoPolicy, actor: dict[str, Any]) -> Identity:
    """The Linear user, mapped to a policy identity when the repo's `linear_users` names them."""
    user_id = str(actor.get("id") or "")
    name = str(actor.get("name") or "")
    mapped = repo.linear_users.get(user_id) or (repo.linear_users.get(actor["email"]) if actor.get("email") else None)
    if mapped:
        kind, sep, ident = mapped.partition(":")
        if not sep or kind not in ("local", "slack", "github", "linear", "ci", "system") or not ident:
            raise ValueError(f"repos.{repo.name}.linear_users maps {user_id} to {mapped!r}, not a KIND:ID principal")
        return Identity(kind=kind, id=ident, display=f"{name} (via Linear)" if name else mapped)  # type: ignore[arg-type]
    return Identity(kind="linear", id=user_id, display=name)


def newly_labeled(payload: dict[str, Any], label: str) -> bool:
    data = payload.get("data") or {}
    labels = data.get("labels") or []
    label_ids = {lbl.get("id") for lbl in labels if str(lbl.get("name", "")).lower() == label.lower()}
    if not label_ids:
        return False
    action = payload.get("action")
    if action == "create":
        return True
    if action == "update":
        updated_from = payload.get("updatedFrom") or {}
        if "labelIds" not in updated_from:
            return False  # labels did not change in this update
        return not (label_ids & set(updated_from.get("labelIds") or []))
    return False


class LinearWebhookReceiver:
    def __init__(
        self,
        settings: Settings,
        config: ConveyorConfig | None = None,
        starter: Starter | None = None,
        linear: Any | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.config = config if config is not None else load_config(settings)
        self.linear_settings = settings.linear()
        if linear is None and self.linear_settings.api_key:
            from adapters.linear import LinearClient

            linear = LinearClient.from_settings(self.linear_settings)
        self.linear = linear
        self._starter = starter
        self._client = None
        self.clock = clock
        self._seen: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/", self.handle)
        app.router.add_post("/linear/webhook", self.handle)
        app.router.add_get("/healthz", self.health)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _start(self, request: TaskRequest) -> Any:
        if self._starter is not None:
            return await self._starter(request)
        from triggers import service

        if self._client is None:
            self._client = await service.connect(self.settings)
        return await service.start_task(self._client, request, self.settings)

    async def _comment(self, issue_id: str, body: str) -> None:
        if self.linear is None or not issue_id:
            return
        try:
            await asyncio.to_thread(self.linear.comment, issue_id, body)
        except Exception as exc:  # noqa: BLE001 - a failed courtesy comment must not fail the delivery
            log.warning("could not comment on Linear issue %s: %s", issue_id, exc)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "body too large"}, status=413)
        secret = self.linear_settings.webhook_secret
        if not secret:
            return web.json_response({"error": "LINEAR_WEBHOOK_SECRET is not configured"}, status=503)
        if not verify_signature(secret, raw, request.headers.get("Linear-Signature", "")):
            return web.json_response({"error": "bad signature"}, status=401)
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except ValueError:
            return web.json_response({"error": "body is not a JSON object"}, status=400)
        stamp = payload.get("webhookTimestamp")
        if not isinstance(stamp, (int, float)) or abs(self.clock() * 1000 - stamp) > TIMESTAMP_WINDOW_S * 1000:
            return web.json_response({"error": "webhookTimestamp missing or outside the 60 s window"}, status=401)
        delivery = request.headers.get("Linear-Delivery", "").strip()
        if not delivery:
            return web.json_response({"error": "Linear-Delivery header missing"}, status=400)
        key = event_key(payload)
        if key in self._seen:
            return web.json_response({**self._seen[key], "duplicate": True})
        try:
            answer, status = await self._event(payload, delivery, key)
        except ServiceUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)  # Linear retries the delivery
        except (AttributeError, TypeError, KeyError, ValueError) as exc:
            # a signed payload of an unexpected shape (a string where an object belongs, ...)
            log.warning("Linear delivery %s: malformed payload: %r", delivery, exc)
            return web.json_response({"error": "malformed Issue payload"}, status=400)
        if status == 200:
            self._seen[key] = answer
            while len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
        return web.json_response(answer, status=status)

    async def _event(self, payload: dict[str, Any], delivery: str, key: str) -> tuple[dict[str, Any], int]:
        if payload.get("type") != "Issue" or payload.get("action") not in ("create", "update"):
            return {"ignored": f"{payload.get('type')} {payload.get('action')} events start nothing"}, 200
        label = self.linear_settings.label
        if not newly_labeled(payload, label):
            return {"ignored": f"the {label!r} label was not just added"}, 200
        data = payload.get("data") or {}
        issue_id = str(data.get("id") or "")
        identifier = str(data.get("identifier") or issue_id)
        repo = repo_for_team(self.config, data.get("team") or {}, str(data.get("teamId") or ""))
        if repo is None:
            team = (data.get("team") or {}).get("key") or data.get("teamId")
            await self._comment(issue_id, f"Conveyor: no repository is configured for Linear team `{team}` (set `linear_team` in conveyor.toml).")
            return {"ignored": f"no repository for Linear team {team}"}, 200
        # Whoever added the label is the requester. The issue's creator is not a stand-in: an
        # automation or an unmapped user labeling an invoker's issue would act as that invoker.
        actor = payload.get("actor") or {}
        if not actor.get("id"):
            return {"ignored": "the event names no Linear user"}, 200
        try:
            requester = requester_for(repo, actor)
        except ValueError as exc:
            await self._comment(issue_id, f"Conveyor: {exc}")
            return {"refused": str(exc)}, 200

        conversation: list[str] = []
        if self.linear is not None:
            try:
                conversation = await asyncio.to_thread(self.linear.issue_conversation, issue_id)
            except Exception as exc:  # noqa: BLE001 - the payload's description is the fallback
                log.warning("could not read Linear issue %s: %s", identifier, exc)
        if not conversation and (data.get("description") or "").strip():
            conversation = [f"{identifier} {data.get('title', '')}\n\n{data['description'].strip()}"]

        title = str(data.get("title") or "").strip()
        description = str(data.get("description") or "").strip()
        text = f"{identifier}: {title}" + (f"\n\n{description}" if description else "")
        if len(text) > MAX_TASK_CHARS:
            text = text[: MAX_TASK_CHARS - 60].rstrip() + "\n\n[description truncated; see the Linear issue]"
        origin = Origin(
            source="linear", delivery_id=delivery, linear_issue_id=issue_id,
            url=str(payload.get("url") or data.get("url") or ""), conversation=conversation,
        )
        from triggers import service

        try:
            task = service.build_request(repo, text, requester, origin, task_id=service.task_id_for("linear", key))
        except service.ServiceError as exc:
            await self._comment(issue_id, f"Conveyor did not start a task: {exc}")
            return {"refused": str(exc)}, 200
        try:
            result = await self._start(task)
        except service.Unavailable as exc:
            raise ServiceUnavailable(str(exc)) from exc
        log.info("Linear %s -> task %s (started=%s)", identifier, result.task_id, result.started)
        return {"task_id": result.task_id, "started": bool(result.started), "repo": repo.name}, 200


class ServiceUnavailable(Exception):
    pass


async def serve(receiver: LinearWebhookReceiver, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def _cmd(args: argparse.Namespace) -> int:
    settings = Settings()
    receiver = LinearWebhookReceiver(settings)
    if not receiver.linear_settings.webhook_secret:
        print("error: LINEAR_WEBHOOK_SECRET is not set; refusing to accept unsigned webhooks")
        return 2

    async def main() -> None:
        runner = await serve(receiver, args.host, args.port)
        print(f"Linear webhooks on http://{args.host}:{args.port}/linear/webhook (label {receiver.linear_settings.label!r})")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("linear-webhooks", help="receive Linear webhooks: issues labeled for the agent become tasks")
    p.add_argument("--port", type=int, default=8091)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=_cmd)
