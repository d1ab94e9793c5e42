"""The GitHub code host, through PyGithub (REST + the GraphQL `revertPullRequest` mutation).

Auth: GITHUB_TOKEN, or a GitHub App (GITHUB_APP_ID + GITHUB_APP_PRIVATE_KEY) whose installation
token per repository is cached and refreshed before it expires (and once more if GitHub rejects it).
GITHUB_API_URL points at GitHub Enterprise Server (`https://ghe.example.com/api/v3`).

Git traffic (fetch for checkouts/context, push for publish and revert) goes through a trusted bare
mirror per repository (adapters.codehost.github_git); the token never reaches a checkout.

Errors become CodeHostError: rate limits (primary, secondary, 429) and 5xx are retryable (a short
wait is retried here, a long one is left to the activity retry policy); 401/403/404/422 are not,
with a message naming the repository and the permission that is missing.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import requests
from github import Auth, Github, GithubException, GithubIntegration
from github.PullRequest import PullRequest
from github.Repository import Repository

from adapters.codehost.base import CodeHostError, CommitInfo, PublishRequest
from adapters.codehost.github_git import GitMirror, redact
from conveyor.config import GitHubSettings, RepoPolicy, Settings
from conveyor.models import ChangeRequest, ChecksResult, MergeResult, RevertResult

log = logging.getLogger("conveyor.codehost.github")

T = TypeVar("T")

COMMENT_LIMIT = 65536
"""GitHub rejects issue/PR comments longer than this many characters."""
CONVEYOR_LABEL = "conveyor"
TOKEN_REFRESH_MARGIN_S = 300
"""Installation tokens live one hour; get a new one when less than this is left."""

_PASSING = {"success", "neutral", "skipped"}
_FAILING_CONCLUSIONS = {"failure", "cancelled", "timed_out", "action_required", "stale", "startup_failure", "error"}

# What each operation needs, phrased for both fine-grained/App permissions and classic scopes.
PERM_READ = "Contents: read (classic token: `repo` scope)"
PERM_CHECKS = "Checks: read and Commit statuses: read (classic token: `repo` scope)"
PERM_WRITE_PR = "Contents: write and Pull requests: write (classic token: `repo` scope)"
PERM_COMMENT = "Pull requests: write (classic token: `repo` scope)"


@dataclass(frozen=True)
class RepoRef:
    owner: str
    name: str
    clone_url: str

    @property
    def full(self) -> str:
        return f"{self.owner}/{self.name}"


def parse_repo_url(url: str) -> RepoRef:
    """`https://host/owner/repo[.git]` (or `git@host:owner/repo.git`) -> owner, name, https clone URL."""
    raw = url.strip()
    if m := re.fullmatch(r"git@([^:]+):([^/]+)/([^/]+?)(?:\.git)?/?", raw):
        raw = f"https://{m[1]}/{m[2]}/{m[3]}"
    parsed = urllib.parse.urlsplit(raw)
    parts = [p for p in parsed.path.split("/") if p]
    if parsed.scheme not in {"http", "https"} or len(parts) < 2 or parsed.username or parsed.password:
        raise CodeHostError(
            f"GitHub repository URL {parsed.scheme}://{parsed.hostname or ''}{parsed.path} must look like "
            "https://<host>/<owner>/<repo> (no credentials in it)",
            retryable=False,
        )
    owner, name = parts[-2], parts[-1].removesuffix(".git")
    base_path = "/".join(parts[:-2] + [owner, name])
    return RepoRef(owner, name, f"{parsed.scheme}://{parsed.netloc}/{base_path}.git")


def _load_private_key(value: str) -> str:
    """GITHUB_APP_PRIVATE_KEY may hold the PEM itself (newlines or literal \\n) or a path to it."""
    text = value.strip()
    if "-----BEGIN" in text:
        return text.replace("\\n", "\n")
    path = Path(text).expanduser()
    if path.is_file():
        return path.read_text()
    raise CodeHostError("GITHUB_APP_PRIVATE_KEY is neither a PEM private key nor a readable file", retryable=False)


class _Credentials:
    """Hands out an authenticated PyGithub client and the matching git token for a repository."""

    def __init__(self, cfg: GitHubSettings, pacing: tuple[float, float]):
        self.cfg = cfg
        self.pacing = pacing
        self.api_url = cfg.api_url.rstrip("/")
        self.is_app = bool(cfg.app_id and cfg.app_private_key)
        if not self.is_app and not cfg.token:
            raise CodeHostError(
                "GitHub is not configured: set GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY",
                retryable=False,
            )
        self._lock = threading.Lock()
        self._token_client: Github | None = None
        self._integration: GithubIntegration | None = None
        self._installation_of: dict[str, int] = {}
        self._tokens: dict[int, tuple[str, float, Github]] = {}

    def _client(self, token: str) -> Github:
        # retry=None: we classify failures ourselves instead of sleeping inside the HTTP library.
        return Github(auth=Auth.Token(token), base_url=self.api_url, timeout=30, retry=None, per_page=100,
                      user_agent="Conveyor", lazy=True, seconds_between_requests=self.pacing[0],
                      seconds_between_writes=self.pacing[1])

    def _app(self) -> GithubIntegration:
        if self._integration is None:
            auth = Auth.AppAuth(self.cfg.app_id, _load_private_key(self.cfg.app_private_key))
            self._integration = GithubIntegration(auth=auth, base_url=self.api_url, timeout=30, retry=None,
                                                  user_agent="Conveyor")
        return self._integration

    def get(self, ref: RepoRef) -> tuple[Github, str]:
        if not self.is_app:
            if self._token_client is None:
                self._token_client = self._client(self.cfg.token)
            return self._token_client, self.cfg.token
        with self._lock:
            installation = self._installation_of.get(ref.full)
            if installation is None:
                installation = self._app().get_repo_installation(ref.owner, ref.name).id
                self._installation_of[ref.full] = installation
            cached = self._tokens.get(installation)
            if cached and cached[1] - time.time() > TOKEN_REFRESH_MARGIN_S:
                return cached[2], cached[0]
            grant = self._app().get_access_token(installation)
            expires = grant.expires_at
            expires_ts = expires.timestamp() if isinstance(expires, datetime) else time.time() + 3600
            client = self._client(grant.token)
            self._tokens[installation] = (grant.token, expires_ts, client)
            log.info("github: new installation token for %s (installation %s, expires %s)", ref.full, installation,
                     datetime.fromtimestamp(expires_ts, tz=timezone.utc).isoformat())
            return client, grant.token

    def invalidate(self, ref: RepoRef) -> None:
        with self._lock:
            installation = self._installation_of.pop(ref.full, None)
            if installation is not None:
                self._tokens.pop(installation, None)

    def secrets(self) -> list[str]:
        return [s for s in [self.cfg.token, *(t[0] for t in self._tokens.values())] if s]


_CREDENTIALS: dict[tuple[str, ...], _Credentials] = {}
_CREDENTIALS_LOCK = threading.Lock()


def _shared_credentials(cfg: GitHubSettings, pacing: tuple[float, float]) -> _Credentials:
    """One credential cache per identity in the worker process: activities build a code host per
    call, and installation tokens should be reused across them until they near expiry."""
    key = (cfg.api_url, cfg.token, cfg.app_id, cfg.app_private_key, repr(pacing))
    with _CREDENTIALS_LOCK:
        creds = _CREDENTIALS.get(key)
        if creds is None:
            creds = _CREDENTIALS[key] = _Credentials(cfg, pacing)
        return creds


def _message(exc: GithubException) -> str:
    data = exc.data if isinstance(exc.data, dict) else {}
    msg = str(data.get("message") or exc.message or "")
    errors = data.get("errors")
    if isinstance(errors, list) and errors:
        details = "; ".join(str(e.get("message") or e.get("code") or e) if isinstance(e, dict) else str(e) for e in errors)
        msg = f"{msg} ({details})" if msg else details
    return msg or f"HTTP {exc.status}"


def _header(exc: GithubException, name: str) -> str | None:
    for key, value in (exc.headers or {}).items():
        if key.lower() == name.lower():
            return str(value)
    return None


def retry_wait(exc: GithubException) -> float | None:
    """Seconds to wait before retrying, or None when the failure is not retryable."""
    status = exc.status
    msg = _message(exc).lower()
    retry_after = _header(exc, "Retry-After")
    if status == 429 or (status == 403 and ("secondary rate limit" in msg or retry_after)):
        return float(retry_after) if retry_after and retry_after.isdigit() else 60.0
    if status in (403, 429) and ("rate limit" in msg or _header(exc, "X-RateLimit-Remaining") == "0"):
        reset = _header(exc, "X-RateLimit-Reset")
        return max(0.0, float(reset) - time.time()) + 1 if reset and reset.isdigit() else 60.0
    if status >= 500:
        return 1.0
    return None


class GitHubCodeHost:
    """CodeHost over GitHub / GitHub Enterprise Server."""

    name = "github"

    def __init__(self, settings: Settings, github: GitHubSettings | None = None, *, max_inline_wait_s: float = 5.0,
                 inline_retries: int = 2, pacing: tuple[float, float] | None = None):
        """`pacing` = (seconds between requests, seconds between writes): GitHub's advice against
        secondary rate limits (PyGithub's defaults). Tests against the emulator pass (0, 0)."""
        self.settings = settings
        if pacing is None:
            raw = os.environ.get("CONVEYOR_GITHUB_PACING", "0.25,1.0")
            try:
                first, second = (float(x) for x in raw.split(","))
            except ValueError:
                raise CodeHostError(f"CONVEYOR_GITHUB_PACING must be 'SECONDS_BETWEEN_REQUESTS,SECONDS_BETWEEN_WRITES', not {raw!r}",
                                    retryable=False) from None
            pacing = (first, second)
        self._creds = _shared_credentials(github or settings.github(), pacing)
        self.max_inline_wait_s = max_inline_wait_s
        self.inline_retries = inline_retries
        self._mirrors: dict[str, GitMirror] = {}
        self._mirror_root = settings.workspaces_dir / "github-mirrors"

    # ---- plumbing ----------------------------------------------------------------------

    def _ref(self, repo: RepoPolicy) -> RepoRef:
        if repo.host != "github":
            raise CodeHostError(f"repository {repo.name} is configured for host {repo.host!r}, not github", retryable=False)
        return parse_repo_url(repo.url)

    def _call(self, ref: RepoRef, what: str, permission: str, fn: Callable[[Repository], T],
              passthrough: frozenset[int] = frozenset()) -> T:
        """Run `fn` against the repository with error classification and short inline retries.
        Statuses in `passthrough` re-raise the GithubException for the caller to interpret."""
        attempt = 0
        refreshed = False
        while True:
            try:
                gh, _ = self._creds.get(ref)
                return fn(gh.get_repo(ref.full))
            except GithubException as exc:
                if exc.status in passthrough:
                    raise
                if exc.status == 401 and self._creds.is_app and not refreshed:
                    # An installation token can be revoked or expire early: get a new one, once.
                    log.info("github: installation token rejected for %s; refreshing", ref.full)
                    self._creds.invalidate(ref)
                    refreshed = True
                    continue
                wait = retry_wait(exc)
                if wait is not None and attempt < self.inline_retries and wait <= self.max_inline_wait_s:
                    attempt += 1
                    log.info("github: %s on %s got HTTP %s; retrying in %.1fs", what, ref.full, exc.status, wait)
                    time.sleep(wait)
                    continue
                raise self._error(exc, ref, what, permission, wait) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt < self.inline_retries:
                    attempt += 1
                    time.sleep(0.5 * attempt)
                    continue
                raise CodeHostError(f"GitHub unreachable while trying to {what} on {ref.full}: {type(exc).__name__}",
                                    retryable=True) from None

    def _error(self, exc: GithubException, ref: RepoRef, what: str, permission: str, wait: float | None) -> CodeHostError:
        msg = redact(_message(exc), self._creds.secrets())
        status = exc.status
        if wait is not None:
            kind = ("rate limited" if status in (403, 429) else "server error")
            return CodeHostError(f"GitHub {kind} (HTTP {status}: {msg}) while trying to {what} on {ref.full}; "
                                 f"retry in about {wait:.0f}s", retryable=True)
        who = "the GitHub App installation" if self._creds.is_app else "GITHUB_TOKEN"
        if status == 401:
            text = (f"GitHub rejected the credentials (401 {msg}) while trying to {what} on {ref.full}: "
                    f"check {'GITHUB_APP_ID / GITHUB_APP_PRIVATE_KEY' if self._creds.is_app else 'GITHUB_TOKEN'}")
        elif status == 403:
            text = (f"GitHub refused to {what} on {ref.full} (403 {msg}): {who} needs {permission}")
        elif status == 404:
            text = (f"GitHub returned 404 while trying to {what} on {ref.full}: the repository (or object) does not "
                    f"exist or is not visible to {who}; it needs {permission}"
                    + (" and the App must be installed on the repository" if self._creds.is_app else ""))
        else:
            text = f"GitHub could not {what} on {ref.full} (HTTP {status}: {msg})"
        return CodeHostError(text, retryable=False)

    def _mirror(self, ref: RepoRef) -> GitMirror:
        mirror = self._mirrors.get(ref.clone_url)
        if mirror is None:
            mirror = GitMirror(self._mirror_root, ref.clone_url, lambda: self._git_token(ref),
                               (self.settings.bot_name, self.settings.bot_email))
            self._mirrors[ref.clone_url] = mirror
        return mirror

    def _git_token(self, ref: RepoRef) -> str:
        try:
            return self._creds.get(ref)[1]
        except GithubException as exc:
            raise self._error(exc, ref, "get an installation token", "the App installed on the repository",
                              retry_wait(exc)) from None

    def _git(self, ref: RepoRef, fn: Callable[[GitMirror], T]) -> T:
        """Git over HTTPS; an App token GitHub rejects is refreshed once."""
        try:
            return fn(self._mirror(ref))
        except CodeHostError as exc:
            text = str(exc).lower()
            if self._creds.is_app and any(s in text for s in ("401", "authentication failed", "could not read username")):
                self._creds.invalidate(ref)
                return fn(self._mirror(ref))
            raise

    def _pull(self, ref: RepoRef, number: int, permission: str = PERM_WRITE_PR) -> PullRequest:
        """A fully loaded pull request. (PyGithub objects are lazy: loading inside `_call` keeps
        every HTTP error classified, and list results lack fields such as `merged`.)"""

        def load(r: Repository) -> PullRequest:
            pr = r.get_pull(number)
            _ = pr.raw_data  # completes the object now
            return pr

        return self._call(ref, f"read pull request #{number}", permission, load)

    def _find_open_pull(self, ref: RepoRef, branch: str, base: str | None = None) -> PullRequest | None:
        def find(r: Repository) -> PullRequest | None:
            kwargs: dict[str, Any] = {"state": "open", "head": f"{ref.owner}:{branch}"}
            if base:
                kwargs["base"] = base
            for pr in r.get_pulls(**kwargs):
                return pr
            return None

        return self._call(ref, f"look up the pull request for {branch}", PERM_WRITE_PR, find)

    # ---- CodeHost: reading -------------------------------------------------------------

    def resolve_base(self, repo: RepoPolicy, base: str) -> str:
        ref = self._ref(repo)
        return self._call(ref, f"read branch {base!r}", PERM_READ, lambda r: r.get_branch(base).commit.sha)

    def checkout(self, repo: RepoPolicy, sha: str, dest: Path) -> None:
        ref = self._ref(repo)
        self._git(ref, lambda m: m.ensure_commit(sha))
        self._mirror(ref).checkout(sha, Path(dest))

    def read_file(self, repo: RepoPolicy, sha: str, path: str) -> bytes | None:
        ref = self._ref(repo)
        mirror = self._mirror(ref)
        self._git(ref, lambda m: m.ensure_commit(sha))
        clean = path.strip().lstrip("/")
        if not clean or any(part == ".." for part in clean.split("/")):
            raise CodeHostError(f"invalid repository path {path!r}", retryable=False)
        kind = mirror.git("cat-file", "-t", f"{sha}:{clean}", check=False).stdout.decode().strip()
        if kind != "blob":
            return None
        return mirror.git("cat-file", "blob", f"{sha}:{clean}").stdout

    def recent_commits(self, repo: RepoPolicy, sha: str, limit: int) -> list[CommitInfo]:
        ref = self._ref(repo)
        mirror = self._mirror(ref)
        self._git(ref, lambda m: m.ensure_commit(sha))
        out = mirror.git("log", f"-n{max(0, limit)}", "--no-renames", "--name-only",
                         "--format=%x1e%H%x00%s%x00%an%x00%aI", sha).stdout.decode(errors="replace")
        commits = []
        for chunk in out.split("\x1e")[1:]:
            header, _, files = chunk.partition("\n")
            commit_sha, subject, author, date = header.split("\x00")
            commits.append(CommitInfo(sha=commit_sha, subject=subject, author=author, date=date,
                                      paths=[f for f in files.splitlines() if f.strip()]))
        return commits

    def _check_states(self, ref: RepoRef, sha: str) -> dict[str, tuple[str, str]]:
        """name -> (success|failure|pending, link) from both commit statuses and check runs."""

        def read(r: Repository) -> dict[str, tuple[str, str]]:
            commit = r.get_commit(sha)
            found: dict[str, tuple[str, str]] = {}
            rank = {"failure": 2, "pending": 1, "success": 0}

            def put(name: str, state: str, link: str) -> None:
                if name not in found or rank[state] > rank[found[name][0]]:
                    found[name] = (state, link)

            for status in commit.get_combined_status().statuses:
                state = {"success": "success", "pending": "pending"}.get(status.state, "failure")
                put(status.context, state, status.target_url or "")
            latest: dict[str, Any] = {}
            for run in commit.get_check_runs():
                prev = latest.get(run.name)
                if prev is None or run.id > prev.id:
                    latest[run.name] = run
            for name, run in latest.items():
                if run.status != "completed":
                    state = "pending"
                elif run.conclusion in _PASSING:
                    state = "success"
                else:
                    state = "failure"
                put(name, state, run.html_url or run.details_url or "")
            return found

        return self._call(ref, f"read the checks of {sha[:12]}", PERM_CHECKS, read)

    def base_ci_status(self, repo: RepoPolicy, sha: str) -> str:
        states = self._check_states(self._ref(repo), sha)
        if not states:
            return "unknown"
        failing = sorted(n for n, (s, _) in states.items() if s == "failure")
        pending = sorted(n for n, (s, _) in states.items() if s == "pending")
        if failing:
            return "failing: " + ", ".join(failing)
        if pending:
            return "pending: " + ", ".join(pending)
        return "green"

    def checks(self, repo: RepoPolicy, change: ChangeRequest) -> ChecksResult:
        """Green only when every required check of the policy passed on the PR head."""
        states = self._check_states(self._ref(repo), change.head_sha)
        required = repo.required_checks
        others_failing = sorted(n for n, (s, _) in states.items() if s == "failure" and n not in required)
        note = f" (not required, failing: {', '.join(others_failing)})" if others_failing else ""
        if not required:
            return ChecksResult(state="green", detail="no checks are required by the repository policy" + note)
        failing = [f"{n}: {states[n][1]}" if states[n][1] else n for n in required if n in states and states[n][0] == "failure"]
        if failing:
            return ChecksResult(state="failed", failing=failing,
                                detail=f"required checks failed on {change.head_sha[:12]}: " + ", ".join(failing))
        waiting = [n for n in required if n not in states or states[n][0] == "pending"]
        if waiting:
            missing = [n for n in waiting if n not in states]
            detail = "waiting for " + ", ".join(waiting) + (f" (not reported yet: {', '.join(missing)})" if missing else "")
            return ChecksResult(state="pending", detail=detail + note)
        return ChecksResult(state="green", detail="required checks passed: " + ", ".join(required) + note)

    # ---- CodeHost: writing -------------------------------------------------------------

    def publish(self, repo: RepoPolicy, request: PublishRequest) -> ChangeRequest:
        ref = self._ref(repo)
        mirror = self._mirror(ref)
        branch = request.branch
        self._git(ref, lambda m: m.ensure_commit(request.base_sha, branch_hint=request.base))
        remote = self._remote_branch(ref, branch)
        # Where the commit goes: on base_sha for a new branch; replacing our own earlier attempt
        # (a retried publish or a re-run of this task); on top of the branch head for a follow-up
        # task on an existing Conveyor branch (its patch was made against that head), including
        # when base_sha names that head explicitly.
        parent = request.base_sha
        ours = False
        if remote is not None and remote != request.base_sha:
            remote_message = mirror.git("log", "-1", "--format=%B", remote).stdout.decode(errors="replace")
            ours = re.search(rf"^Conveyor-Task: {re.escape(request.task_id)}\s*$", remote_message, re.M) is not None
            parent = (mirror.rev(f"{remote}^") or request.base_sha) if ours else remote
        new_sha, tree = mirror.commit_patch(parent, request.patch, request.commit_message)
        if remote is not None and ours and mirror.rev(f"{remote}^{{tree}}") == tree:
            head = remote  # a retried publish: the same change is already there
        else:
            self._git(ref, lambda m: m.push(new_sha, branch, expect=remote or ""))
            head = new_sha
        pr = self._find_open_pull(ref, branch, request.base)
        if pr is None:
            pr = self._call(ref, f"open a pull request for {branch}", PERM_WRITE_PR,
                            lambda r: r.create_pull(base=request.base, head=branch, title=request.title[:256],
                                                    body=_fit(request.body), draft=False))
            log.info("github: opened %s#%s for %s", ref.full, pr.number, branch)
        labels = _dedupe([CONVEYOR_LABEL, *repo.labels, *request.labels])
        self._call(ref, f"label pull request #{pr.number}", "Pull requests: write or Issues: write",
                   lambda r: pr.add_to_labels(*labels))
        self._request_reviewers(ref, pr, _dedupe([*repo.reviewers, *request.reviewers]))
        if request.transcript_text:
            self._archive_transcript(ref, pr, request.transcript_text)
        files, added, removed = mirror.numstat(parent, head)
        return ChangeRequest(number=pr.number, branch=branch, head_sha=head, base=request.base, url=pr.html_url,
                             files_changed=files, lines_added=added, lines_removed=removed)

    def _remote_branch(self, ref: RepoRef, branch: str) -> str | None:
        """The remote sha of `branch` (fetched into the mirror), or None."""

        def look(m: GitMirror) -> str | None:
            out = m.git("ls-remote", m.clone_url, f"refs/heads/{branch}", token=self._git_token(ref),
                        what="git ls-remote", need="Contents: read").stdout.decode().split()
            if not out:
                return None
            if not m.has(out[0]):
                m.fetch(f"+refs/heads/{branch}:refs/heads/{branch}")
            return out[0]

        return self._git(ref, look)

    def _request_reviewers(self, ref: RepoRef, pr: PullRequest, reviewers: list[str]) -> None:
        if not reviewers:
            return
        users = [r for r in reviewers if "/" not in r]
        teams = [r.split("/", 1)[1] for r in reviewers if "/" in r]
        already = {u.login for u in pr.requested_reviewers} | {t.slug for t in pr.requested_teams}
        users = [u for u in users if u not in already]
        teams = [t for t in teams if t not in already]
        if not users and not teams:
            return
        try:
            self._call(ref, f"request reviewers on #{pr.number}", PERM_WRITE_PR,
                       lambda r: pr.create_review_request(reviewers=users or [], team_reviewers=teams or []))
        except CodeHostError as exc:
            if exc.retryable:
                raise
            # A reviewer who is not a collaborator (or is the author) must not block the change.
            log.warning("github: could not request reviewers %s on %s#%s: %s", users + teams, ref.full, pr.number, exc)

    def _archive_transcript(self, ref: RepoRef, pr: PullRequest, transcript: str) -> None:
        marker = "<!-- conveyor:transcript -->"
        comments = self._call(ref, f"read comments of #{pr.number}", PERM_COMMENT, lambda r: list(pr.get_issue_comments()))
        if any(marker in (c.body or "") for c in comments):
            return
        body = transcript_comment(transcript, marker)
        self._call(ref, f"comment on #{pr.number}", PERM_COMMENT, lambda r: pr.create_issue_comment(body))

    def merge(self, repo: RepoPolicy, change: ChangeRequest, approved_head: str, message: str) -> MergeResult:
        ref = self._ref(repo)
        if change.number is None:
            raise CodeHostError(f"change on {change.branch} has no pull request number", retryable=False)
        number = change.number
        pr = self._pull(ref, number)
        merged = self._merged_result(ref, pr, approved_head)
        if merged is not None:
            return merged
        if pr.state != "open":
            return MergeResult(outcome="not_mergeable", detail=f"pull request #{number} is closed")
        if pr.head.sha != approved_head:
            return MergeResult(outcome="head_moved", detail=f"the branch head is {pr.head.sha[:12]}, but "
                               f"{approved_head[:12]} was approved; review the new commits")
        title, _, body = message.partition("\n")
        try:
            status = self._call(ref, f"merge pull request #{number}", PERM_WRITE_PR,
                                lambda r: pr.merge(commit_title=title.strip() or pr.title, commit_message=body.strip(),
                                                   merge_method=repo.merge_method, sha=approved_head),
                                passthrough=frozenset({405, 409}))
        except GithubException as exc:
            reason = _message(exc)
            if exc.status == 409:
                return MergeResult(outcome="head_moved", detail=f"GitHub: {reason}; review the new commits")
            # A retried merge whose first attempt landed also gets 405: look before concluding.
            fresh = self._pull(ref, number)
            merged = self._merged_result(ref, fresh, approved_head)
            if merged is not None:
                return merged
            state = fresh.mergeable_state
            lowered = reason.lower()
            if state == "behind" or "base branch was modified" in lowered or "up to date" in lowered:
                return MergeResult(outcome="needs_rebase", detail=f"GitHub: {reason}")
            return MergeResult(outcome="not_mergeable", detail=f"GitHub: {reason} (mergeable state: {state})")
        self._delete_branch(ref, change.branch)
        return MergeResult(outcome="merged", merge_sha=status.sha, detail=f"merged #{number} by {repo.merge_method}")

    def _merged_result(self, ref: RepoRef, pr: PullRequest, approved_head: str) -> MergeResult | None:
        if not pr.merged:
            return None
        if pr.head.sha != approved_head:
            return MergeResult(outcome="head_moved", detail=f"#{pr.number} was merged at {pr.head.sha[:12]}, "
                               f"not at the approved {approved_head[:12]}")
        self._delete_branch(ref, pr.head.ref)
        return MergeResult(outcome="merged", merge_sha=pr.merge_commit_sha or "", detail=f"#{pr.number} already merged")

    def _delete_branch(self, ref: RepoRef, branch: str) -> None:
        try:
            self._call(ref, f"delete branch {branch}", PERM_WRITE_PR, lambda r: r.get_git_ref(f"heads/{branch}").delete())
        except CodeHostError as exc:
            if exc.retryable:
                raise
            log.info("github: branch %s on %s not deleted: %s", branch, ref.full, exc)

    def close(self, repo: RepoPolicy, change: ChangeRequest, reason: str) -> None:
        ref = self._ref(repo)
        if change.number is None:
            return
        number = change.number
        pr = self._pull(ref, number)
        if pr.state != "open":
            return
        if reason.strip():
            self._call(ref, f"comment on #{number}", PERM_COMMENT, lambda r: pr.create_issue_comment(_fit(reason)))
        self._call(ref, f"close pull request #{number}", PERM_WRITE_PR, lambda r: pr.edit(state="closed"))

    def comment(self, repo: RepoPolicy, change: ChangeRequest, text: str) -> None:
        ref = self._ref(repo)
        if change.number is None:
            raise CodeHostError(f"change on {change.branch} has no pull request to comment on", retryable=False)
        number = change.number
        self._call(ref, f"comment on #{number}", PERM_COMMENT,
                   lambda r: r.get_issue(number).create_comment(_fit(text)))

    # ---- revert ------------------------------------------------------------------------

    def revert(self, repo: RepoPolicy, base: str, merge_sha: str, message: str, task_id: str,
               emergency: bool) -> RevertResult:
        ref = self._ref(repo)
        marker = f"<!-- conveyor:revert:{task_id} -->"
        title, _, body = message.partition("\n")
        title = title.strip() or f"Revert {merge_sha[:12]}"
        body = f"{body.strip()}\n\n{marker}".strip()
        original = self._pull_for_merge(ref, merge_sha)
        # Only a revert PR opened by the same account as the change being reverted (i.e. by us)
        # counts: anyone can open a PR whose body carries the marker, and an emergency revert
        # merges the PR it finds.
        existing = self._find_revert(ref, base, marker, author=original.user.login if original is not None else None,
                                     own_branch=f"conveyor/revert-{task_id}")
        if existing is not None:
            existing = self._pull(ref, existing.number)
            if existing.merged:
                return RevertResult(revert_sha=existing.merge_commit_sha or "", url=existing.html_url, already=True)
            if existing.state == "open":
                return self._finish_revert(ref, repo, existing, emergency, already=True)
        pr = None
        if original is not None:
            pr = self._graphql_revert(ref, original, title, body)
        if pr is None:
            pr = self._branch_revert(ref, repo, base, merge_sha, original, title, body, task_id)
        self._call(ref, f"label pull request #{pr.number}", "Pull requests: write or Issues: write",
                   lambda r: pr.add_to_labels(CONVEYOR_LABEL))
        return self._finish_revert(ref, repo, pr, emergency, already=False)

    def _find_revert(self, ref: RepoRef, base: str, marker: str, author: str | None, own_branch: str) -> PullRequest | None:
        """Our earlier revert PR for this task: carries the marker, comes from this repository (not a
        fork), and was opened by `author` (the account that opened the reverted PR); with no known
        author, only our own revert branch counts."""

        def ours(pr: PullRequest) -> bool:
            head_repo = pr.head.repo
            if head_repo is None or head_repo.full_name.lower() != ref.full.lower():
                return False
            if author is not None:
                return pr.user is not None and pr.user.login == author
            return pr.head.ref == own_branch

        def find(r: Repository) -> PullRequest | None:
            for i, pr in enumerate(r.get_pulls(state="all", base=base, sort="created", direction="desc")):
                if marker in (pr.body or "") and ours(pr):
                    return pr
                if i >= 99:
                    break
            return None

        return self._call(ref, "look for an earlier revert", PERM_WRITE_PR, find)

    def _pull_for_merge(self, ref: RepoRef, merge_sha: str) -> PullRequest | None:
        def find(r: Repository) -> int | None:
            for pr in r.get_commit(merge_sha).get_pulls():
                if pr.merge_commit_sha == merge_sha:
                    return pr.number
            return None

        number = self._call(ref, f"find the pull request merged as {merge_sha[:12]}", PERM_READ, find)
        return None if number is None else self._pull(ref, number, PERM_READ)

    def _graphql_revert(self, ref: RepoRef, original: PullRequest, title: str, body: str) -> PullRequest | None:
        """GitHub's own revertPullRequest; None when this server does not have the mutation."""
        query = ("mutation($input: RevertPullRequestInput!) { revertPullRequest(input: $input) "
                 "{ revertPullRequest { number url headRefName } } }")
        variables = {"input": {"pullRequestId": original.node_id, "title": title, "body": _fit(body), "draft": False}}

        def run(r: Repository) -> dict[str, Any] | None:
            gh, _ = self._creds.get(ref)
            try:
                _, data = gh.requester.graphql_query(query, variables)
            except GithubException as exc:
                errors = exc.data.get("errors") if isinstance(exc.data, dict) else None
                text = str(errors or _message(exc))
                if exc.status == 404 or "undefinedField" in text or "doesn't exist on type" in text:
                    log.info("github: revertPullRequest not available on %s; reverting with a branch", self._creds.api_url)
                    return None
                if exc.status == 400 and errors:
                    raise CodeHostError(f"GitHub could not revert #{original.number} on {ref.full}: {text[:500]}",
                                        retryable=False) from None
                raise
            return data["data"]["revertPullRequest"]["revertPullRequest"]

        result = self._call(ref, f"revert pull request #{original.number}", PERM_WRITE_PR, run)
        if result is None:
            return None
        number = int(result["number"])
        return self._pull(ref, number)

    def _branch_revert(self, ref: RepoRef, repo: RepoPolicy, base: str, merge_sha: str,
                       original: PullRequest | None, title: str, body: str, task_id: str) -> PullRequest:
        mirror = self._mirror(ref)
        branch = f"conveyor/revert-{task_id}"
        self._git(ref, lambda m: m.fetch(f"+refs/heads/{base}:refs/heads/{base}"))
        self._git(ref, lambda m: m.ensure_commit(merge_sha))
        onto = mirror.rev(f"refs/heads/{base}")
        parents = mirror.git("rev-list", "--parents", "-n1", merge_sha).stdout.decode().split()[1:]
        if len(parents) >= 2:
            before = parents[0]
        else:
            count = original.commits if (original is not None and repo.merge_method == "rebase") else 1
            before = mirror.rev(f"{merge_sha}~{count}") or parents[0]
        assert onto is not None
        sha = mirror.revert_commit(onto, merge_sha, before, f"{title}\n\n{body}\n")
        remote = self._remote_branch(ref, branch)
        self._git(ref, lambda m: m.push(sha, branch, expect=remote or ""))
        pr = self._find_open_pull(ref, branch, base)
        if pr is None:
            pr = self._call(ref, f"open the revert pull request for {branch}", PERM_WRITE_PR,
                            lambda r: r.create_pull(base=base, head=branch, title=title[:256], body=_fit(body)))
        return pr

    def _finish_revert(self, ref: RepoRef, repo: RepoPolicy, pr: PullRequest, emergency: bool,
                       already: bool) -> RevertResult:
        if not emergency:
            return RevertResult(url=pr.html_url, already=already, pending_review=True)
        head = pr.head.sha
        change = ChangeRequest(number=pr.number, branch=pr.head.ref, head_sha=head, base=pr.base.ref, url=pr.html_url)
        result = self.merge(repo, change, head, f"{pr.title}\n\n{pr.body or ''}")
        if result.outcome != "merged":
            # Branch protection (required checks/reviews) can block even an emergency revert:
            # leave it open and say so instead of pretending it landed.
            log.warning("github: emergency revert %s could not be merged: %s", pr.html_url, result.detail)
            return RevertResult(url=pr.html_url, already=already, pending_review=True,
                                detail=f"the revert could not be merged at once ({result.outcome}): {result.detail}")
        return RevertResult(revert_sha=result.merge_sha, url=pr.html_url, already=already)

    # ---- extras for the webhook trigger ------------------------------------------------

    def pull_branch(self, repo: RepoPolicy, number: int) -> tuple[str, str]:
        """(head branch, base branch) of pull request `number`. A head in a fork comes back as
        `owner:branch`: a fork's branch named `conveyor/cv-...` is not our task's branch, and a
        follow-up must never push onto the same-named branch here."""
        ref = self._ref(repo)
        pr = self._pull(ref, number, PERM_READ)
        head_repo = pr.head.repo
        if head_repo is None or head_repo.full_name.lower() != ref.full.lower():
            return pr.head.label or f"(deleted fork):{pr.head.ref}", pr.base.ref
        return pr.head.ref, pr.base.ref


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


_MENTION = re.compile(r"(?<![\w`/])@(?=[A-Za-z0-9])")


def neutralize(text: str) -> str:
    """Bodies and comments carry untrusted text (task text, the agent's summary, reasons): no
    @user / @org/team pings (a zero-width space after the @), and no images, which GitHub's
    image proxy fetches on view (an exfiltration channel for an agent). Markdown stays readable."""
    text = _MENTION.sub("@\u200b", text)
    return re.sub(r"<(\s*img\b)", r"&lt;\1", text.replace("![", "!\\["), flags=re.I)


def _fit(text: str, limit: int = COMMENT_LIMIT) -> str:
    text = neutralize(text)
    if len(text) <= limit:
        return text
    note = "\n\n… (truncated)"
    return text[: limit - len(note)] + note


def transcript_comment(transcript: str, marker: str = "<!-- conveyor:transcript -->", limit: int = COMMENT_LIMIT) -> str:
    """The transcript in a collapsed <details> block, within GitHub's comment limit (head and tail kept)."""
    longest = max((len(m) for m in re.findall(r"`+", transcript)), default=0)
    fence = "`" * max(3, longest + 1)
    head = f"{marker}\n<details><summary>Agent transcript ({len(transcript):,} characters"
    tail = f"\n{fence}\n\n</details>\n"

    def render(text: str, cut: bool) -> str:
        return f"{head}{', truncated' if cut else ''})</summary>\n\n{fence}text\n{text}{tail}"

    full = render(transcript, False)
    if len(full) <= limit:
        return full
    budget = limit - len(render("", True)) - 80
    cut = len(transcript) - budget
    gap = f"\n… {cut:,} characters cut …\n"
    keep_head = budget // 3
    text = transcript[:keep_head] + gap + transcript[len(transcript) - (budget - keep_head - len(gap)):]
    return render(text, True)
