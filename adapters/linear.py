"""Linear GraphQL API client: agent-tagged issues for context, issue conversations for tasks,
and comments back on the issue.

Auth: a personal API key goes in `Authorization: <key>` as is; an OAuth access token as
`Bearer <token>` (LINEAR_API_KEY may hold either form).
"""

from __future__ import annotations

import uuid
from typing import Any

import requests

from conveyor.config import LinearSettings, Settings

DEFAULT_TIMEOUT_S = 10.0
_OPEN_STATES = ["completed", "canceled"]


class LinearError(Exception):
    """A Linear API failure; `retryable` for transport errors, rate limits and 5xx."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


ISSUES_QUERY = """
query AgentIssues($filter: IssueFilter, $first: Int) {
  issues(filter: $filter, first: $first, orderBy: updatedAt) {
    nodes { id identifier title url priority state { name type } }
  }
}
"""

ISSUE_CONVERSATION_QUERY = """
query IssueConversation($id: String!, $first: Int) {
  issue(id: $id) {
    id identifier title description url
    team { id key name }
    comments(first: $first) { nodes { id body createdAt user { id name displayName } } }
  }
}
"""

COMMENT_CREATE = """
mutation CommentCreate($input: CommentCreateInput!) {
  commentCreate(input: $input) { success comment { id } }
}
"""

COMMENT_QUERY = """
query Comment($id: String!) { comment(id: $id) { id } }
"""

COMMENT_UPDATE = """
mutation CommentUpdate($id: String!, $input: CommentUpdateInput!) {
  commentUpdate(id: $id, input: $input) { success comment { id } }
}
"""


class LinearClient:
    def __init__(
        self,
        api_key: str,
        api_url: str = "https://api.linear.app/graphql",
        label: str = "agent",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: requests.Session | None = None,
    ):
        if not api_key:
            raise ValueError("LINEAR_API_KEY is not set: the Linear client needs an API key")
        self.api_url = api_url
        self.label = label
        self.timeout_s = timeout_s
        self._session = session or requests.Session()
        self._auth = api_key

    @classmethod
    def from_settings(cls, settings: Settings | LinearSettings) -> "LinearClient":
        linear = settings.linear() if isinstance(settings, Settings) else settings
        return cls(linear.api_key, linear.api_url, linear.label)

    @classmethod
    def optional(cls, settings: Settings | LinearSettings) -> "LinearClient | None":
        """The client when LINEAR_API_KEY is configured, else None (context just skips Linear)."""
        linear = settings.linear() if isinstance(settings, Settings) else settings
        return cls(linear.api_key, linear.api_url, linear.label) if linear.api_key else None

    # ---- transport ------------------------------------------------------------------------

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = self._session.post(
                self.api_url,
                json={"query": query, "variables": variables or {}},
                headers={"Authorization": self._auth, "Content-Type": "application/json"},
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            raise LinearError(f"Linear API unreachable at {self.api_url}: {exc}") from exc
        if resp.status_code == 429 or resp.status_code >= 500:
            raise LinearError(f"Linear API answered {resp.status_code}")
        try:
            body = resp.json()
        except ValueError:
            raise LinearError(f"Linear API answered {resp.status_code} with a non-JSON body", retryable=False) from None
        errors = body.get("errors") or []
        if errors:
            first = errors[0]
            code = ((first.get("extensions") or {}).get("code") or "").upper()
            message = "; ".join(str(e.get("message", e)) for e in errors)
            retryable = code in {"RATELIMITED", "INTERNAL_SERVER_ERROR"}
            raise LinearError(f"Linear API error: {message}", retryable=retryable)
        if resp.status_code >= 400:
            raise LinearError(f"Linear API answered {resp.status_code}", retryable=False)
        return body.get("data") or {}

    # ---- reads ------------------------------------------------------------------------------

    def agent_issues(self, team: str | None = None, label: str | None = None, limit: int = 20) -> list[str]:
        """Open issues carrying the agent label (optionally in one team, by key), one line each:
        'ENG-12 Title [state] url'."""
        issue_filter: dict[str, Any] = {
            "labels": {"some": {"name": {"eqIgnoreCase": label or self.label}}},
            "state": {"type": {"nin": _OPEN_STATES}},
        }
        if team:
            issue_filter["team"] = {"key": {"eq": team}}
        data = self.graphql(ISSUES_QUERY, {"filter": issue_filter, "first": limit})
        lines = []
        for node in (data.get("issues") or {}).get("nodes") or []:
            state = (node.get("state") or {}).get("name", "")
            lines.append(f"{node.get('identifier', '?')} {node.get('title', '').strip()} [{state}] {node.get('url', '')}".strip())
        return sorted(lines)

    def issue(self, issue_id: str, comments: int = 50) -> dict[str, Any]:
        data = self.graphql(ISSUE_CONVERSATION_QUERY, {"id": issue_id, "first": comments})
        issue = data.get("issue")
        if not issue:
            raise LinearError(f"Linear issue {issue_id} not found", retryable=False)
        return issue

    def issue_conversation(self, issue_id: str, comments: int = 50) -> list[str]:
        """The issue's description then its comments, oldest first, as 'Name: text'."""
        issue = self.issue(issue_id, comments)
        messages = []
        if (issue.get("description") or "").strip():
            messages.append(f"{issue.get('identifier', '')} {issue.get('title', '')}\n\n{issue['description'].strip()}")
        nodes = sorted((issue.get("comments") or {}).get("nodes") or [], key=lambda c: c.get("createdAt", ""))
        for comment in nodes:
            user = comment.get("user") or {}
            who = user.get("displayName") or user.get("name") or "someone"
            messages.append(f"{who}: {comment.get('body', '').strip()}")
        return messages

    # ---- writes -----------------------------------------------------------------------------

    def comment(self, issue_id: str, body: str, comment_id: str | None = None) -> str:
        """Create a comment. With `comment_id` (a UUID) the create is idempotent: a retry that
        finds the comment already there counts as done."""
        payload: dict[str, Any] = {"issueId": issue_id, "body": body}
        if comment_id:
            payload["id"] = comment_id
        try:
            data = self.graphql(COMMENT_CREATE, {"input": payload})
        except LinearError:
            # A retry after a create whose answer was lost: the id is taken by our own comment.
            if comment_id and self._comment_exists(comment_id):
                return comment_id
            raise
        result = data.get("commentCreate") or {}
        if not result.get("success"):
            raise LinearError(f"Linear did not create the comment on {issue_id}")
        return (result.get("comment") or {}).get("id", comment_id or "")

    def _comment_exists(self, comment_id: str) -> bool:
        try:
            return bool((self.graphql(COMMENT_QUERY, {"id": comment_id}).get("comment") or {}).get("id"))
        except LinearError as exc:
            if exc.retryable:
                raise
            return False

    def update_comment(self, comment_id: str, body: str) -> bool:
        """Edit a comment in place; False when it does not exist (yet)."""
        try:
            data = self.graphql(COMMENT_UPDATE, {"id": comment_id, "input": {"body": body}})
        except LinearError as exc:
            if not exc.retryable and not self._comment_exists(comment_id):
                return False
            raise
        return bool((data.get("commentUpdate") or {}).get("success"))

    def upsert_comment(self, issue_id: str, comment_id: str, body: str) -> str:
        if self.update_comment(comment_id, body):
            return comment_id
        return self.comment(issue_id, body, comment_id)


def stable_comment_id(*parts: str) -> str:
    """Deterministic UUID for a comment, so retried notifications never duplicate it."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "conveyor:" + "\0".join(parts)))
