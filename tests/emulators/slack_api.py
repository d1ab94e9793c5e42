"""A Slack emulator for tests: the Web API that our code calls, and the Slack side that calls us.

`SlackWebAPI` serves `/api/<method>` on 127.0.0.1 and answers like Slack does (``{"ok": true, ...}``
or ``{"ok": false, "error": "..."}`` with HTTP 200), so the real slack_sdk clients (sync and async)
and bolt run unmodified against it via ``base_url``/``SLACK_API_URL``. It records every call,
including the POSTs to ``response_url``s it hands out, and keeps channel history so
`chat.update` / `conversations.replies` behave statefully.

`SlackSender` is Slack's outbound half: it signs slash commands, Events API callbacks,
block_actions and view_submission payloads with the signing secret (v0 HMAC-SHA256 over
``v0:{timestamp}:{body}``) and posts them to the app over real HTTP.

It runs a threaded HTTP server (not asyncio) so that synchronous callers on the test's event
loop thread (the sync WebClient in the notifier) and async callers can share it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from tests.emulators import LoopbackServer


@dataclass
class Call:
    method: str
    """Web API method (`chat.postMessage`...) or `response_url`."""
    args: dict[str, Any]
    token: str = ""
    at: float = field(default_factory=time.time)
    path: str = ""


class SlackWebAPI(LoopbackServer):
    def __init__(
        self,
        bot_token: str = "xoxb-test-token",
        bot_user_id: str = "UBOT",
        team_id: str = "T0001",
        users: dict[str, str] | None = None,
        app_token: str = "xapp-test-token",
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.socket_url = ""
        """Set by SocketModeServer: what apps.connections.open hands out."""
        self.bot_user_id = bot_user_id
        self.bot_id = "BBOT"
        self.team_id = team_id
        self.users = dict(users or {})
        """user id -> display name, for users.info."""
        self.calls: list[Call] = []
        self.messages: dict[str, list[dict[str, Any]]] = {}
        """channel -> messages (top-level and thread replies), oldest first."""
        self.views: list[dict[str, Any]] = []
        self._failures: dict[str, list[str]] = {}
        self._lock = threading.Condition()
        self._ts = itertools.count(1)
        self._trigger_ids: set[str] = set()

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "SlackWebAPI":
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                emulator._handle(self)

            def do_POST(self) -> None:
                emulator._handle(self)

        self.serve(Handler, "slack-emulator")
        return self

    @property
    def base_url(self) -> str:
        """What SLACK_API_URL / WebClient(base_url=...) should be."""
        return f"http://127.0.0.1:{self.port}/api/"

    # ---- test helpers ------------------------------------------------------------------------

    def response_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/response/{name}"

    def new_trigger_id(self) -> str:
        """Slack issues trigger ids with each interaction; views.open accepts only those."""
        trigger_id = f"{next(self._ts)}.{int(time.time())}.{hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:16]}"
        with self._lock:
            self._trigger_ids.add(trigger_id)
        return trigger_id

    def fail_next(self, method: str, error: str) -> None:
        """Make the next call of `method` answer ``{"ok": false, "error": error}``."""
        with self._lock:
            self._failures.setdefault(method, []).append(error)

    def rate_limit_next(self, method: str, retry_after: int = 1) -> None:
        """Answer the next call of `method` the way Slack throttles: HTTP 429 + Retry-After."""
        with self._lock:
            self._failures.setdefault(method, []).append(f"429:{retry_after}")

    def calls_of(self, method: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        """Block until predicate() is truthy (re-checked on every recorded call)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"timed out waiting for {what}; calls: {[c.method for c in self.calls]}")
                self._lock.wait(min(remaining, 0.05))

    async def await_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        """Async variant that does not block the event loop (the app under test runs there)."""
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; calls: {[c.method for c in self.calls]}")
            await asyncio.sleep(0.02)

    def message(self, channel: str, ts: str) -> dict[str, Any] | None:
        with self._lock:
            for msg in self.messages.get(channel, []):
                if msg["ts"] == ts:
                    return msg
        return None

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                m for m in self.messages.get(channel, []) if m["ts"] == thread_ts or m.get("thread_ts") == thread_ts
            ]

    def seed_message(self, channel: str, text: str, user: str, thread_ts: str = "") -> str:
        """A message a human posted (for conversation context)."""
        with self._lock:
            ts = self._next_ts()
            msg = {"type": "message", "ts": ts, "user": user, "text": text}
            if thread_ts:
                msg["thread_ts"] = thread_ts
            self.messages.setdefault(channel, []).append(msg)
            return ts

    # ---- HTTP --------------------------------------------------------------------------------

    def _next_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(req.path)
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        args: dict[str, Any] = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip()
        if raw:
            if ctype == "application/json":
                try:
                    args.update(json.loads(raw))
                except json.JSONDecodeError:
                    self._reply(req, 400, {"ok": False, "error": "invalid_json"})
                    return
            else:
                args.update({k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode()).items()})
        token = args.pop("token", "")
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer ") :]

        if parsed.path.startswith("/response/"):
            call = Call("response_url", args, token, path=parsed.path[len("/response/") :])
            self._record(call)
            # Slack answers response_url posts with a bare "ok" body.
            self._reply_text(req, 200, "ok")
            return
        if not parsed.path.startswith("/api/"):
            self._reply(req, 404, {"ok": False, "error": "unknown_path"})
            return
        method = parsed.path[len("/api/") :]
        # form-encoded clients send JSON-valued args (blocks, metadata, view) as strings
        for key in ("blocks", "attachments", "metadata", "view"):
            if isinstance(args.get(key), str):
                try:
                    args[key] = json.loads(args[key])
                except json.JSONDecodeError:
                    self._record(Call(method, args, token))
                    self._reply(req, 200, {"ok": False, "error": f"invalid_{key}"})
                    return
        call = Call(method, args, token)
        self._record(call)
        with self._lock:
            injected = self._failures.get(method)
            error = injected.pop(0) if injected else None
        if error and error.startswith("429:"):
            data = json.dumps({"ok": False, "error": "ratelimited"}).encode()
            req.send_response(429)
            req.send_header("Retry-After", error.split(":", 1)[1])
            req.send_header("Content-Type", "application/json; charset=utf-8")
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
            return
        if error:
            self._reply(req, 200, {"ok": False, "error": error})
            return
        if not token:
            self._reply(req, 200, {"ok": False, "error": "not_authed"})
            return
        if method == "apps.connections.open":
            # the one method that takes the app-level token (xapp-), and only that
            if token != self.app_token:
                self._reply(req, 200, {"ok": False, "error": "invalid_auth" if not token.startswith("xoxb-") else "not_allowed_token_type"})
                return
        elif token != self.bot_token:
            self._reply(req, 200, {"ok": False, "error": "invalid_auth"})
            return
        handler = getattr(self, "_api_" + method.replace(".", "_"), None)
        if handler is None:
            self._reply(req, 200, {"ok": False, "error": "unknown_method"})
            return
        with self._lock:
            body = handler(args)
            self._lock.notify_all()
        self._reply(req, 200, body)

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)
            self._lock.notify_all()

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json; charset=utf-8")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    @staticmethod
    def _reply_text(req: BaseHTTPRequestHandler, status: int, text: str) -> None:
        data = text.encode()
        req.send_response(status)
        req.send_header("Content-Type", "text/html")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    # ---- Web API methods (called with the lock held) -----------------------------------------

    @staticmethod
    def _blocks_error(args: dict[str, Any]) -> str | None:
        blocks = args.get("blocks")
        if blocks is None:
            return None
        if not isinstance(blocks, list) or len(blocks) > 50:
            return "invalid_blocks"
        for block in blocks:
            if not isinstance(block, dict) or "type" not in block:
                return "invalid_blocks"
            if block["type"] == "actions" and not block.get("elements"):
                return "invalid_blocks"
            if block["type"] == "section" and not (block.get("text") or block.get("fields")):
                return "invalid_blocks"
            text = block.get("text")
            if isinstance(text, dict) and len(text.get("text", "")) > 3000:
                return "invalid_blocks"
        return None

    def _api_auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://emulated.slack.com/",
            "team": "Emulated",
            "user": "conveyor",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _api_apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self.socket_url:
            return {"ok": False, "error": "socket_mode_not_enabled"}
        return {"ok": True, "url": self.socket_url}

    def _api_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = args.get("channel", "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not args.get("text") and not args.get("blocks"):
            return {"ok": False, "error": "no_text"}
        if err := self._blocks_error(args):
            return {"ok": False, "error": err}
        thread_ts = args.get("thread_ts") or ""
        if thread_ts and self.message(channel, thread_ts) is None:
            # Slack posts to the channel when the thread parent is unknown; we are stricter,
            # because a reply landing outside its thread is always our bug.
            return {"ok": False, "error": "thread_not_found"}
        msg: dict[str, Any] = {
            "type": "message",
            "ts": self._next_ts(),
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "text": args.get("text", ""),
            "blocks": args.get("blocks") or [],
        }
        if thread_ts:
            msg["thread_ts"] = thread_ts
        if args.get("metadata"):
            msg["metadata"] = args["metadata"]
        self.messages.setdefault(channel, []).append(msg)
        return {"ok": True, "channel": channel, "ts": msg["ts"], "message": msg}

    def _api_chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = args.get("channel", ""), args.get("ts", "")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        msg = self.message(channel, ts)
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if msg.get("user") != self.bot_user_id:
            return {"ok": False, "error": "cant_update_message"}
        if "text" not in args and "blocks" not in args:
            return {"ok": False, "error": "no_text"}
        if err := self._blocks_error(args):
            return {"ok": False, "error": err}
        if "text" in args:
            msg["text"] = args["text"]
        if "blocks" in args:
            msg["blocks"] = args["blocks"] or []
        if args.get("metadata"):
            msg["metadata"] = args["metadata"]
        msg["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        return {"ok": True, "channel": channel, "ts": ts, "text": msg["text"], "message": msg}

    def _api_chat_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = args.get("channel", ""), args.get("ts", "")
        msgs = self.messages.get(channel, [])
        for i, msg in enumerate(msgs):
            if msg["ts"] == ts:
                del msgs[i]
                return {"ok": True, "channel": channel, "ts": ts}
        return {"ok": False, "error": "message_not_found"}

    def _api_chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        if not args.get("user"):
            return {"ok": False, "error": "user_not_in_channel"}
        if not args.get("text") and not args.get("blocks"):
            return {"ok": False, "error": "no_text"}
        return {"ok": True, "message_ts": self._next_ts()}

    def _api_views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        trigger_id = args.get("trigger_id", "")
        if trigger_id not in self._trigger_ids:
            return {"ok": False, "error": "invalid_trigger_id"}
        view = args.get("view")
        if not isinstance(view, dict) or view.get("type") != "modal" or not view.get("title"):
            return {"ok": False, "error": "invalid_arguments"}
        if not isinstance(view.get("blocks"), list) or not view["blocks"]:
            return {"ok": False, "error": "invalid_arguments"}
        self._trigger_ids.discard(trigger_id)  # a trigger id opens one view
        stored = dict(view, id=f"V{len(self.views) + 1:05d}", team_id=self.team_id, state={"values": {}})
        self.views.append(stored)
        return {"ok": True, "view": stored}

    def _api_conversations_replies(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = args.get("channel", ""), args.get("ts", "")
        if channel not in self.messages:
            return {"ok": False, "error": "channel_not_found"}
        # Like Slack, the ts of a reply names its whole thread (parent first).
        named = next((m for m in self.messages[channel] if m["ts"] == ts), None)
        if named is not None and named.get("thread_ts"):
            ts = named["thread_ts"]
        thread = [m for m in self.messages[channel] if m["ts"] == ts or m.get("thread_ts") == ts]
        if not thread:
            return {"ok": False, "error": "thread_not_found"}
        include_meta = str(args.get("include_all_metadata", "")).lower() in ("1", "true")
        out = []
        for m in thread:
            m = dict(m)
            if not include_meta:
                m.pop("metadata", None)
            out.append(m)
        limit = int(args.get("limit") or 1000)
        return {"ok": True, "messages": out[:limit], "has_more": len(out) > limit}

    def _api_users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = args.get("user", "")
        if user not in self.users:
            return {"ok": False, "error": "user_not_found"}
        name = self.users[user]
        return {"ok": True, "user": {"id": user, "name": name, "real_name": name, "profile": {"display_name": name}}}


# ---- Socket Mode: Slack's WebSocket side -------------------------------------------------------


class SocketModeServer:
    """Slack's Socket Mode endpoint: greets with `hello`, pushes envelopes, collects the app's acks.

    Runs its own event loop in a thread (aiohttp's WebSocket server), like the Web API emulator."""

    def __init__(self, api: SlackWebAPI) -> None:
        self.api = api
        self.acks: dict[str, dict[str, Any]] = {}
        self.connected = threading.Event()
        self._ws: Any = None
        self._loop: Any = None
        self._runner: Any = None
        self._ready = threading.Event()
        self._cond = threading.Condition()

    def start(self) -> "SocketModeServer":
        import asyncio

        from aiohttp import WSMsgType, web

        async def link(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self._ws = ws
            await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "emulator"},
                                "connection_info": {"app_id": "A0001"}})
            self.connected.set()
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    with self._cond:
                        self.acks[data.get("envelope_id", "")] = data
                        self._cond.notify_all()
            return ws

        async def boot() -> None:
            app = web.Application()
            app.router.add_get("/link", link)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.api.socket_url = f"ws://127.0.0.1:{port}/link"
            self._ready.set()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(boot())
            self._loop.run_forever()

        threading.Thread(target=run, name="slack-socket-mode", daemon=True).start()
        self._ready.wait(5)
        return self

    def stop(self) -> None:
        import asyncio

        if self._loop is not None:
            async def down() -> None:
                if self._ws is not None:
                    await self._ws.close()
                await self._runner.cleanup()

            asyncio.run_coroutine_threadsafe(down(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)

    def send(self, envelope_type: str, payload: dict[str, Any]) -> str:
        """Push one envelope (`slash_commands`, `events_api`, `interactive`); returns its id."""
        import asyncio

        envelope_id = hashlib.sha1(f"{time.time_ns()}".encode()).hexdigest()
        envelope = {"envelope_id": envelope_id, "type": envelope_type, "payload": payload,
                    "accepts_response_payload": envelope_type != "events_api", "retry_attempt": 0, "retry_reason": ""}
        asyncio.run_coroutine_threadsafe(self._ws.send_json(envelope), self._loop).result(5)
        return envelope_id

    async def ack_for(self, envelope_id: str, timeout: float = 5.0) -> dict[str, Any]:
        import asyncio

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if envelope_id in self.acks:
                    return self.acks[envelope_id]
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no ack for envelope {envelope_id}")


# ---- the Slack side: signed requests to the app --------------------------------------------------


def slack_escape(text: str) -> str:
    """What Slack does to user text before sending it to an app (`&`, `<`, `>` as entities)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sign(secret: str, timestamp: int, body: str) -> str:
    base = f"v0:{timestamp}:{body}".encode()
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


@dataclass
class Delivery:
    status: int
    body: str
    headers: dict[str, str]
    elapsed_s: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class SlackSender:
    """Posts signed payloads to the app's /slack/events the way Slack does."""

    def __init__(self, url: str, signing_secret: str, api: SlackWebAPI, team_id: str = "T0001") -> None:
        self.url = url
        self.secret = signing_secret
        self.api = api
        self.team_id = team_id
        self._n = itertools.count(1)

    def post(
        self,
        body: str,
        content_type: str,
        timestamp: int | None = None,
        signature: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Delivery:
        ts = int(time.time()) if timestamp is None else timestamp
        hdrs = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": str(ts),
            "X-Slack-Signature": signature if signature is not None else sign(self.secret, ts, body),
        }
        hdrs.update(headers or {})
        req = urllib.request.Request(self.url, data=body.encode(), headers=hdrs, method="POST")
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read().decode()
                return Delivery(resp.status, text, dict(resp.headers), time.perf_counter() - start)
        except urllib.error.HTTPError as err:
            return Delivery(err.code, err.read().decode(), dict(err.headers), time.perf_counter() - start)

    # -- payload builders (field names as Slack sends them) --

    def slash_body(self, text: str, user: str = "U100", user_name: str = "alice", channel: str = "C100",
                   command: str = "/agent", trigger_id: str | None = None) -> tuple[str, dict[str, str]]:
        n = next(self._n)
        user_name = self.api.users.get(user, user_name)
        form = {
            "token": "deprecated-verification-token",
            "team_id": self.team_id,
            "team_domain": "emulated",
            "channel_id": channel,
            "channel_name": "dev",
            "user_id": user,
            "user_name": user_name,
            "command": command,
            "text": slack_escape(text),
            "api_app_id": "A0001",
            "is_enterprise_install": "false",
            "response_url": self.api.response_url(f"cmd-{n}"),
            "trigger_id": trigger_id or self.api.new_trigger_id(),
        }
        return urllib.parse.urlencode(form), form

    def slash(self, text: str, **kw: Any) -> Delivery:
        body, _ = self.slash_body(text, **kw)
        return self.post(body, "application/x-www-form-urlencoded")

    def event_body(self, event: dict[str, Any], event_id: str | None = None) -> str:
        payload = {
            "token": "deprecated-verification-token",
            "team_id": self.team_id,
            "api_app_id": "A0001",
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{next(self._n):08d}",
            "event_time": int(time.time()),
            "authorizations": [{"team_id": self.team_id, "user_id": self.api.bot_user_id, "is_bot": True}],
        }
        return json.dumps(payload)

    def event(self, event: dict[str, Any], event_id: str | None = None, retry_num: int | None = None) -> Delivery:
        headers = {}
        if retry_num:
            headers = {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
        return self.post(self.event_body(event, event_id), "application/json", headers=headers)

    def mention(self, text: str, channel: str = "C100", user: str = "U100", ts: str | None = None,
                thread_ts: str = "", event_id: str | None = None, retry_num: int | None = None) -> Delivery:
        event = {
            "type": "app_mention",
            "user": user,
            "text": f"<@{self.api.bot_user_id}> {slack_escape(text)}",
            "ts": ts or self.api.seed_message(channel, f"<@{self.api.bot_user_id}> {slack_escape(text)}", user, thread_ts),
            "channel": channel,
            "event_ts": ts or f"{time.time():.6f}",
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        return self.event(event, event_id=event_id, retry_num=retry_num)

    def _interactive(self, payload: dict[str, Any]) -> Delivery:
        body = urllib.parse.urlencode({"payload": json.dumps(payload)})
        return self.post(body, "application/x-www-form-urlencoded")

    def click(self, action_id: str, value: str, user: str = "U200", user_name: str = "bob",
              channel: str = "C100", message_ts: str = "", message: dict[str, Any] | None = None) -> Delivery:
        n = next(self._n)
        user_name = self.api.users.get(user, user_name)
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": user_name, "name": user_name, "team_id": self.team_id},
            "api_app_id": "A0001",
            "token": "deprecated-verification-token",
            "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": False},
            "trigger_id": self.api.new_trigger_id(),
            "team": {"id": self.team_id, "domain": "emulated"},
            "channel": {"id": channel, "name": "dev"},
            "message": message or {"type": "message", "ts": message_ts, "text": ""},
            "response_url": self.api.response_url(f"action-{n}"),
            "actions": [
                {
                    "action_id": action_id,
                    "block_id": "conveyor_actions",
                    "type": "button",
                    "value": value,
                    "action_ts": f"{time.time():.6f}",
                }
            ],
        }
        return self._interactive(payload)

    def submit_view(self, view: dict[str, Any], values: dict[str, dict[str, dict[str, Any]]],
                    user: str = "U200", user_name: str = "bob") -> Delivery:
        payload = {
            "type": "view_submission",
            "team": {"id": self.team_id, "domain": "emulated"},
            "user": {"id": user, "username": user_name, "name": user_name, "team_id": self.team_id},
            "api_app_id": "A0001",
            "token": "deprecated-verification-token",
            "trigger_id": self.api.new_trigger_id(),
            "view": dict(view, state={"values": values}),
        }
        return self._interactive(payload)
