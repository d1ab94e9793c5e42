"""A Linear emulator on 127.0.0.1: the GraphQL API (a faithful subset of Linear's schema,
executed by graphql-core, so unknown fields and wrong argument types fail like they do on
Linear) and a webhook sender that signs deliveries the way Linear does.

Used by tests with the real client code (`adapters.linear.LinearClient`) pointed at it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any

from graphql import GraphQLError, build_schema, graphql_sync

from tests.emulators import LoopbackServer

SDL = """
scalar DateTime
scalar JSONObject

enum PaginationOrderBy { createdAt updatedAt }

input StringComparator {
  eq: String, neq: String, in: [String!], nin: [String!], eqIgnoreCase: String, neqIgnoreCase: String,
  contains: String, containsIgnoreCase: String, notContains: String, startsWith: String, endsWith: String
}
input IDComparator { eq: ID, neq: ID, in: [ID!], nin: [ID!] }
input IssueLabelFilter { id: IDComparator, name: StringComparator, and: [IssueLabelFilter!], or: [IssueLabelFilter!] }
input IssueLabelCollectionFilter {
  id: IDComparator, name: StringComparator, some: IssueLabelFilter, every: IssueLabelFilter,
  and: [IssueLabelCollectionFilter!], or: [IssueLabelCollectionFilter!]
}
input WorkflowStateFilter { id: IDComparator, name: StringComparator, type: StringComparator }
input TeamFilter { id: IDComparator, key: StringComparator, name: StringComparator }
input IssueFilter {
  id: IDComparator, title: StringComparator, labels: IssueLabelCollectionFilter, state: WorkflowStateFilter,
  team: TeamFilter, and: [IssueFilter!], or: [IssueFilter!]
}

type User { id: ID!, name: String!, displayName: String!, email: String! }
type Team { id: ID!, key: String!, name: String! }
type WorkflowState { id: ID!, name: String!, type: String! }
type IssueLabel { id: ID!, name: String! }
type IssueLabelConnection { nodes: [IssueLabel!]! }
type Comment { id: ID!, body: String!, createdAt: DateTime!, updatedAt: DateTime!, user: User, issue: Issue }
type CommentConnection { nodes: [Comment!]! }
type Issue {
  id: ID!, identifier: String!, title: String!, description: String, url: String!, priority: Float!,
  createdAt: DateTime!, updatedAt: DateTime!, state: WorkflowState!, team: Team!, creator: User,
  labels(first: Int): IssueLabelConnection!, comments(first: Int, after: String): CommentConnection!
}
type IssueConnection { nodes: [Issue!]! }

type Query {
  issues(filter: IssueFilter, first: Int, after: String, orderBy: PaginationOrderBy, includeArchived: Boolean): IssueConnection!
  issue(id: String!): Issue!
  comment(id: String!): Comment!
  viewer: User!
}

input CommentCreateInput { id: String, issueId: String, body: String, bodyData: JSONObject, parentId: String }
input CommentUpdateInput { body: String, bodyData: JSONObject }
type CommentPayload { lastSyncId: Float!, comment: Comment!, success: Boolean! }

type Mutation {
  commentCreate(input: CommentCreateInput!): CommentPayload!
  commentUpdate(id: String!, input: CommentUpdateInput!): CommentPayload!
}
"""

SCHEMA = build_schema(SDL)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _not_found(kind: str) -> GraphQLError:
    return GraphQLError(
        f"Entity not found: {kind}",
        extensions={"type": "invalid input", "code": "INVALID_INPUT", "userPresentableMessage": f"Could not find referenced {kind}."},
    )


@dataclass
class State:
    users: dict[str, dict] = field(default_factory=dict)
    teams: dict[str, dict] = field(default_factory=dict)
    labels: dict[str, dict] = field(default_factory=dict)
    states: dict[str, dict] = field(default_factory=dict)
    issues: dict[str, dict] = field(default_factory=dict)
    comments: dict[str, dict] = field(default_factory=dict)


def _match_string(value: str | None, comp: dict) -> bool:
    v = value or ""
    checks = {
        "eq": lambda x: v == x, "neq": lambda x: v != x, "in": lambda x: v in x, "nin": lambda x: v not in x,
        "eqIgnoreCase": lambda x: v.lower() == x.lower(), "neqIgnoreCase": lambda x: v.lower() != x.lower(),
        "contains": lambda x: x in v, "containsIgnoreCase": lambda x: x.lower() in v.lower(),
        "notContains": lambda x: x not in v, "startsWith": lambda x: v.startswith(x), "endsWith": lambda x: v.endswith(x),
    }
    return all(checks[k](x) for k, x in comp.items() if x is not None)


def _match_fields(obj: dict, flt: dict) -> bool:
    for key, comp in flt.items():
        if key == "and":
            if not all(_match_fields(obj, f) for f in comp):
                return False
        elif key == "or":
            if not any(_match_fields(obj, f) for f in comp):
                return False
        elif not _match_string(str(obj.get(key, "")), comp):
            return False
    return True


class LinearEmulator(LoopbackServer):
    def __init__(self, api_key: str = "lin_api_test_key", webhook_secret: str = "lin_wh_test_secret"):
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.state = State()
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []
        """HTTP statuses to answer the next requests with (e.g. [500]) before serving normally."""
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    # ---- fixtures -------------------------------------------------------------------------

    def add_user(self, name: str, email: str = "") -> dict:
        user = {"id": str(uuid.uuid4()), "name": name, "displayName": name.split()[0].lower(), "email": email or f"{name.split()[0].lower()}@example.com"}
        self.state.users[user["id"]] = user
        return user

    def add_team(self, key: str, name: str = "") -> dict:
        team = {"id": str(uuid.uuid4()), "key": key, "name": name or key}
        self.state.teams[team["id"]] = team
        for state_name, state_type in (("Todo", "unstarted"), ("In Progress", "started"), ("Done", "completed"), ("Canceled", "canceled")):
            st = {"id": str(uuid.uuid4()), "name": state_name, "type": state_type, "teamId": team["id"]}
            self.state.states[st["id"]] = st
        return team

    def add_label(self, name: str) -> dict:
        label = {"id": str(uuid.uuid4()), "name": name}
        self.state.labels[label["id"]] = label
        return label

    def state_of(self, team: dict, state_type: str) -> dict:
        return next(s for s in self.state.states.values() if s["teamId"] == team["id"] and s["type"] == state_type)

    def add_issue(self, team: dict, title: str, description: str = "", labels: list[dict] | None = None,
                  creator: dict | None = None, state_type: str = "unstarted") -> dict:
        number = sum(1 for i in self.state.issues.values() if i["teamId"] == team["id"]) + 1
        now = _now_iso()
        issue = {
            "id": str(uuid.uuid4()), "identifier": f"{team['key']}-{number}", "number": number, "title": title,
            "description": description, "priority": 0.0, "teamId": team["id"], "stateId": self.state_of(team, state_type)["id"],
            "labelIds": [lbl["id"] for lbl in labels or []], "creatorId": (creator or {}).get("id"),
            "createdAt": now, "updatedAt": now,
        }
        issue["url"] = f"https://linear.app/acme/issue/{issue['identifier'].lower()}/{title.lower().replace(' ', '-')[:40]}"
        self.state.issues[issue["id"]] = issue
        return issue

    def add_comment(self, issue: dict, body: str, user: dict | None = None) -> dict:
        now = _now_iso()
        comment = {"id": str(uuid.uuid4()), "body": body, "issueId": issue["id"], "userId": (user or {}).get("id"),
                   "createdAt": now, "updatedAt": now}
        self.state.comments[comment["id"]] = comment
        return comment

    def comments_on(self, issue: dict) -> list[dict]:
        return sorted((c for c in self.state.comments.values() if c["issueId"] == issue["id"]), key=lambda c: c["createdAt"])

    # ---- GraphQL resolvers (plain dicts, rendered by graphql-core) --------------------------

    def _issue_view(self, issue: dict) -> dict:
        st = self.state
        return {
            **issue,
            "state": st.states[issue["stateId"]],
            "team": st.teams[issue["teamId"]],
            "creator": st.users.get(issue.get("creatorId") or ""),
            "labels": lambda info, **_: {"nodes": [st.labels[i] for i in issue["labelIds"]]},
            "comments": lambda info, first=50, after=None: {"nodes": [self._comment_view(c) for c in self.comments_on(issue)][:first]},
        }

    def _comment_view(self, comment: dict) -> dict:
        return {**comment, "user": self.state.users.get(comment.get("userId") or ""),
                "issue": lambda info: self._issue_view(self.state.issues[comment["issueId"]])}

    def _issue_matches(self, issue: dict, flt: dict) -> bool:
        st = self.state
        for key, comp in (flt or {}).items():
            if key == "and":
                ok = all(self._issue_matches(issue, f) for f in comp)
            elif key == "or":
                ok = any(self._issue_matches(issue, f) for f in comp)
            elif key == "labels":
                labels = [st.labels[i] for i in issue["labelIds"]]
                ok = True
                for lk, lc in comp.items():
                    if lk == "some":
                        ok &= any(_match_fields(lbl, lc) for lbl in labels)
                    elif lk == "every":
                        ok &= all(_match_fields(lbl, lc) for lbl in labels)
                    else:  # a comparator straight on the collection: some label matches
                        ok &= any(_match_fields(lbl, {lk: lc}) for lbl in labels)
            elif key == "state":
                ok = _match_fields(st.states[issue["stateId"]], comp)
            elif key == "team":
                ok = _match_fields(st.teams[issue["teamId"]], comp)
            else:
                ok = _match_fields(issue, {key: comp})
            if not ok:
                return False
        return True

    def _root(self) -> dict:
        st = self.state

        def issues(info, filter=None, first=50, after=None, orderBy=None, includeArchived=False):
            found = [i for i in st.issues.values() if self._issue_matches(i, filter or {})]
            found.sort(key=lambda i: i["createdAt" if orderBy == "createdAt" else "updatedAt"], reverse=True)
            return {"nodes": [self._issue_view(i) for i in found[: first or 50]]}

        def issue(info, id):
            for i in st.issues.values():
                if id in (i["id"], i["identifier"]):
                    return self._issue_view(i)
            raise _not_found("Issue")

        def comment(info, id):
            if id not in st.comments:
                raise _not_found("Comment")
            return self._comment_view(st.comments[id])

        def comment_create(info, input):
            issue_id = input.get("issueId")
            target = next((i for i in st.issues.values() if issue_id in (i["id"], i["identifier"])), None)
            if target is None:
                raise _not_found("Issue")
            if not (input.get("body") or "").strip():
                raise GraphQLError("Argument Validation Error", extensions={"code": "INVALID_INPUT", "type": "invalid input"})
            cid = input.get("id") or str(uuid.uuid4())
            try:
                uuid.UUID(cid)
            except ValueError:
                raise GraphQLError("Argument Validation Error - id must be a UUID", extensions={"code": "INVALID_INPUT"}) from None
            if cid in st.comments:
                raise GraphQLError("Conflict: an entity with this id already exists", extensions={"code": "INVALID_INPUT", "type": "invalid input"})
            new = self.add_comment(target, input["body"], st.users.get(self.viewer_id))
            st.comments.pop(new["id"])
            new["id"] = cid
            st.comments[cid] = new
            return {"success": True, "comment": self._comment_view(new), "lastSyncId": float(next(self._seq))}

        def comment_update(info, id, input):
            if id not in st.comments:
                raise _not_found("Comment")
            st.comments[id].update(body=input.get("body", st.comments[id]["body"]), updatedAt=_now_iso())
            return {"success": True, "comment": self._comment_view(st.comments[id]), "lastSyncId": float(next(self._seq))}

        return {
            "issues": issues, "issue": issue, "comment": comment, "viewer": lambda info: st.users[self.viewer_id],
            "commentCreate": comment_create, "commentUpdate": comment_update,
        }

    viewer_id = ""

    def execute(self, body: dict) -> tuple[int, dict]:
        query = body.get("query")
        if not isinstance(query, str):
            return 400, {"errors": [{"message": "Must provide query string.", "extensions": {"code": "BAD_USER_INPUT"}}]}
        with self._lock:
            result = graphql_sync(SCHEMA, query, root_value=self._root(), variable_values=body.get("variables") or {},
                                  operation_name=body.get("operationName"))
        out: dict[str, Any] = {}
        if result.errors:
            out["errors"] = [e.formatted for e in result.errors]
            if result.data is None:
                return 400, out
        out["data"] = result.data
        return 200, out

    # ---- HTTP ---------------------------------------------------------------------------

    def start(self) -> "LinearEmulator":
        if not self.viewer_id:
            self.viewer_id = self.add_user("Conveyor Bot", "bot@example.com")["id"]
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                auth = self.headers.get("Authorization", "")
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    return self._send(400, {"errors": [{"message": "Invalid JSON body"}]})
                emulator.requests.append({"path": self.path, "auth": auth, "body": body})
                if self.path.rstrip("/") != "/graphql":
                    return self._send(404, {"errors": [{"message": "Not found"}]})
                if emulator.fail_next:
                    return self._send(emulator.fail_next.pop(0), {"errors": [{"message": "Internal server error", "extensions": {"code": "INTERNAL_SERVER_ERROR"}}]})
                if auth not in (emulator.api_key, f"Bearer {emulator.api_key}"):
                    return self._send(400, {"errors": [{"message": "Authentication required, not authenticated",
                                                        "extensions": {"code": "AUTHENTICATION_ERROR", "type": "authentication error",
                                                                       "userPresentableMessage": "You need to authenticate to access this operation."}}]})
                status, payload = emulator.execute(body)
                self._send(status, payload)

        self.serve(Handler, "linear-emulator")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/graphql"

    # ---- webhooks ------------------------------------------------------------------------

    def issue_webhook(self, action: str, issue: dict, actor: dict | None, updated_from: dict | None = None,
                      timestamp_ms: int | None = None) -> dict:
        """An Issue data-change webhook payload shaped like Linear's."""
        st = self.state
        labels = [st.labels[i] for i in issue["labelIds"]]
        team = st.teams[issue["teamId"]]
        state = st.states[issue["stateId"]]
        data = {
            "id": issue["id"], "createdAt": issue["createdAt"], "updatedAt": issue["updatedAt"], "number": issue["number"],
            "title": issue["title"], "description": issue["description"], "priority": issue["priority"],
            "identifier": issue["identifier"], "url": issue["url"], "teamId": team["id"], "stateId": state["id"],
            "creatorId": issue.get("creatorId"), "labelIds": list(issue["labelIds"]),
            "labels": [{"id": lbl["id"], "name": lbl["name"], "color": "#5e6ad2"} for lbl in labels],
            "team": {"id": team["id"], "key": team["key"], "name": team["name"]},
            "state": {"id": state["id"], "name": state["name"], "type": state["type"], "color": "#e2e2e2"},
        }
        payload: dict[str, Any] = {
            "action": action, "type": "Issue", "createdAt": _now_iso(), "data": data, "url": issue["url"],
            "organizationId": "11111111-2222-3333-4444-555555555555", "webhookId": "66666666-7777-8888-9999-000000000000",
            "webhookTimestamp": timestamp_ms if timestamp_ms is not None else int(time.time() * 1000),
        }
        if actor is not None:
            payload["actor"] = {"id": actor["id"], "name": actor["name"], "email": actor["email"], "type": "user"}
        if updated_from is not None:
            payload["updatedFrom"] = updated_from
        return payload

    def sign(self, raw: bytes, secret: str | None = None) -> str:
        return hmac.new((secret or self.webhook_secret).encode(), raw, hashlib.sha256).hexdigest()

    def deliver(self, url: str, payload: dict, delivery_id: str | None = None, signature: str | None = None,
                raw: bytes | None = None) -> tuple[int, dict]:
        """POST a webhook like Linear: raw JSON body, Linear-Delivery / Linear-Event / Linear-Signature."""
        body = raw if raw is not None else json.dumps(payload).encode()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Linear-Webhook",
            "Linear-Delivery": delivery_id or str(uuid.uuid4()),
            "Linear-Event": str(payload.get("type", "")),
            "Linear-Signature": signature if signature is not None else self.sign(body),
        }
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text or b"{}")
            except json.JSONDecodeError:
                return exc.code, {"text": text.decode(errors="replace")}
