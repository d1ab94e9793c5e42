"""A stateful GitHub REST (v3) + GraphQL-revert emulator for tests, on 127.0.0.1.

The real PyGithub client talks to it over HTTP: `GITHUB_API_URL=<emulator.api_url>` (a GHE-style
`/api/v3` base built from the emulator's own address, because PyGithub checks that absolute URLs in
responses match its base URL). Repositories are real bare git repositories; clone, fetch and push go
through `git http-backend` (CGI), and merges/reverts are real git plumbing on those repositories.

Only what Conveyor uses is implemented, with GitHub's status codes and messages for the failure
modes it must handle: 401 bad credentials, 403 missing permission, 404, 405 not mergeable, 409 head
moved, 422 validation, primary/secondary rate limits and 429 (via `fail_next`).

    emu = GitHubEmulator(); emu.start()
    emu.add_token("t0k3n")                      # a PAT-style token with write access
    emu.add_repo("acme", "widgets", bare_path)  # serves bare_path at <emu.web_url>/acme/widgets.git
    emu.set_check(sha, "ci/test", "success")    # a check run (kind="status" for a commit status)
    ...; emu.stop()
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jwt

from tests.emulators import LoopbackServer

GIT_HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
CHECK_CONCLUSIONS = {"success", "failure", "neutral", "cancelled", "skipped", "timed_out", "action_required", "stale"}
STATUS_STATES = {"success", "failure", "error", "pending"}


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(repo: Path, *args: str, input: bytes | None = None, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    full_env.update(
        GIT_AUTHOR_NAME="GitHub", GIT_AUTHOR_EMAIL="noreply@github.com",
        GIT_COMMITTER_NAME="GitHub", GIT_COMMITTER_EMAIL="noreply@github.com",
    )
    full_env.update(env or {})
    proc = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, env=full_env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
    return proc


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, errors: list[Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.errors = errors


@dataclass
class Fault:
    status: int
    message: str
    path_re: re.Pattern[str]
    method: str | None
    times: int
    headers: dict[str, str]


@dataclass
class Check:
    id: int
    name: str
    state: str  # a conclusion, or queued / in_progress / pending
    kind: str  # "check" (check run) or "status" (commit status)
    url: str
    at: float


@dataclass
class Pull:
    number: int
    id: int
    title: str
    body: str
    head: str
    base: str
    user: str
    head_sha: str
    state: str = "open"
    merged: bool = False
    merge_commit_sha: str | None = None
    pre_merge_base: str = ""
    labels: list[str] = field(default_factory=list)
    reviewers: list[str] = field(default_factory=list)
    team_reviewers: list[str] = field(default_factory=list)
    comments: list[dict[str, Any]] = field(default_factory=list)
    head_owner: str = ""
    """Set for a pull request from a fork: the fork's owner (head.repo is then the fork)."""
    created: float = field(default_factory=time.time)
    draft: bool = False


@dataclass
class Repo:
    owner: str
    name: str
    path: Path
    id: int
    default_branch: str = "main"
    required_checks: list[str] = field(default_factory=list)
    pulls: dict[int, Pull] = field(default_factory=dict)
    issues: dict[int, dict[str, Any]] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)
    installation_id: int | None = None


@dataclass
class TokenInfo:
    login: str
    permission: str  # "write" | "read"
    expires_at: float | None = None
    installation_id: int | None = None


class GitHubEmulator(LoopbackServer):
    """Start with `start()`; `api_url` is the PyGithub base URL, `web_url` the html/clone base."""

    def __init__(self, graphql_revert: bool = True):
        self._lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, TokenInfo] = {}
        self.faults: list[Fault] = []
        self.checks: dict[str, list[Check]] = {}
        self.requests: list[tuple[str, str, int]] = []
        """(method, path, status) of every request, for assertions."""
        self.git_auth: list[str] = []
        """The usernames git clients authenticated with (never the secret)."""
        self.graphql_revert = graphql_revert
        self.app_id: str | None = None
        self.app_public_key: str | None = None
        self.installation_token_ttl = 3600
        self.tokens_issued = 0
        self._ids = itertools.count(1000)
        self._numbers: dict[tuple[str, str], itertools.count[int]] = {}

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> "GitHubEmulator":
        emulator = self

        class Handler(_Handler):
            emu = emulator

        self.serve(Handler, "github-emulator")
        return self

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.web_url}/api/v3"

    def repo_url(self, owner: str, name: str) -> str:
        """The RepoPolicy.url for a repository served here."""
        return f"{self.web_url}/{owner}/{name}"

    # ---- test controls -----------------------------------------------------------------

    def add_token(self, token: str, login: str = "conveyor-bot", permission: str = "write") -> None:
        with self._lock:
            self.tokens[token] = TokenInfo(login=login, permission=permission)

    def add_repo(self, owner: str, name: str, bare_path: str | Path, default_branch: str | None = None,
                 required_checks: list[str] | None = None, installation_id: int | None = 1) -> Repo:
        path = Path(bare_path).resolve()
        if default_branch is None:
            head = _git(path, "symbolic-ref", "--short", "HEAD", check=False).stdout.decode().strip()
            default_branch = head or "main"
        with self._lock:
            repo = Repo(owner=owner, name=name, path=path, id=next(self._ids), default_branch=default_branch,
                        required_checks=list(required_checks or []), installation_id=installation_id)
            self.repos[(owner, name)] = repo
            self._numbers[(owner, name)] = itertools.count(1)
            return repo

    def configure_app(self, app_id: str, public_key_pem: str, token_ttl: int = 3600) -> None:
        """Enable GitHub App auth: JWTs signed by the matching private key get installation tokens."""
        with self._lock:
            self.app_id = str(app_id)
            self.app_public_key = public_key_pem
            self.installation_token_ttl = token_ttl

    def expire_installation_tokens(self) -> None:
        """Expire every issued installation token now (server side), as if its hour had passed."""
        with self._lock:
            for info in self.tokens.values():
                if info.installation_id is not None:
                    info.expires_at = time.time() - 1

    def set_check(self, sha: str, name: str, state: str, kind: str = "check", url: str = "") -> None:
        """Report a check run (kind="check": a conclusion, or queued/in_progress) or a commit status
        (kind="status": success/failure/error/pending) for `sha`. The newest report per name wins."""
        if kind == "status" and state not in STATUS_STATES:
            raise ValueError(f"commit status state must be one of {sorted(STATUS_STATES)}")
        if kind == "check" and state not in CHECK_CONCLUSIONS | {"queued", "in_progress"}:
            raise ValueError(f"check run state must be a conclusion or queued/in_progress, not {state!r}")
        with self._lock:
            cid = next(self._ids)
            self.checks.setdefault(sha, []).append(
                Check(id=cid, name=name, state=state, kind=kind, url=url or f"{self.web_url}/ci/{cid}", at=time.time())
            )

    def fail_next(self, path_pattern: str, status: int, message: str = "", method: str | None = None,
                  times: int = 1, headers: dict[str, str] | None = None) -> None:
        """Answer the next `times` requests whose path matches with an error (rate limits, 5xx...)."""
        default = {429: "Too Many Requests", 500: "Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
        with self._lock:
            self.faults.append(Fault(status, message or default.get(status, "error"), re.compile(path_pattern),
                                     method, times, dict(headers or {})))

    def pull(self, owner: str, name: str, number: int) -> Pull:
        return self.repos[(owner, name)].pulls[number]

    def branch_sha(self, owner: str, name: str, branch: str) -> str | None:
        proc = _git(self.repos[(owner, name)].path, "rev-parse", "--verify", "-q", f"refs/heads/{branch}^{{commit}}", check=False)
        return proc.stdout.decode().strip() or None

    # ---- JSON shapes -------------------------------------------------------------------

    def _user(self, login: str) -> dict[str, Any]:
        uid = int(hashlib.sha256(login.encode()).hexdigest()[:6], 16)
        return {"login": login, "id": uid, "node_id": f"U_{uid}", "type": "User",
                "url": f"{self.api_url}/users/{login}", "html_url": f"{self.web_url}/{login}"}

    def _repo_json(self, repo: Repo) -> dict[str, Any]:
        full = f"{repo.owner}/{repo.name}"
        return {
            "id": repo.id, "node_id": f"R_{repo.id}", "name": repo.name, "full_name": full, "private": True,
            "owner": self._user(repo.owner), "default_branch": repo.default_branch,
            "url": f"{self.api_url}/repos/{full}", "html_url": f"{self.web_url}/{full}",
            "clone_url": f"{self.web_url}/{full}.git", "git_url": f"{self.web_url}/{full}.git",
            "permissions": {"admin": False, "push": True, "pull": True},
        }

    def _commit_sha(self, repo: Repo, ref: str) -> str | None:
        proc = _git(repo.path, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
        return proc.stdout.decode().strip() or None

    def _pull_head_sha(self, repo: Repo, pr: Pull) -> str:
        if pr.state == "open":
            sha = self._commit_sha(repo, f"refs/heads/{pr.head}")
            if sha:
                pr.head_sha = sha
        return pr.head_sha

    def _mergeable(self, repo: Repo, pr: Pull) -> tuple[bool | None, str]:
        if pr.merged or pr.state != "open":
            return None, "unknown"
        base = self._commit_sha(repo, f"refs/heads/{pr.base}")
        head = self._pull_head_sha(repo, pr)
        proc = _git(repo.path, "merge-tree", "--write-tree", base or "", head, check=False)
        if proc.returncode != 0:
            return False, "dirty"
        green = self._required_green(repo, head)
        return True, "clean" if green else "blocked"

    def _required_green(self, repo: Repo, sha: str) -> bool:
        latest = self._latest_checks(sha)
        return all(latest.get(name) is not None and latest[name].state in {"success", "neutral", "skipped"}
                   for name in repo.required_checks)

    def _latest_checks(self, sha: str, kind: str | None = None) -> dict[str, Check]:
        latest: dict[str, Check] = {}
        for check in self.checks.get(sha, []):
            if kind is None or check.kind == kind:
                latest[check.name] = check
        return latest

    def _pull_json(self, repo: Repo, pr: Pull, full: bool = True) -> dict[str, Any]:
        """`full=False` is the shape of list endpoints: no merged/mergeable/commits, like GitHub."""
        full = f"{repo.owner}/{repo.name}"
        api = f"{self.api_url}/repos/{full}"
        head_sha = self._pull_head_sha(repo, pr)
        mergeable, mergeable_state = self._mergeable(repo, pr)
        base_sha = self._commit_sha(repo, f"refs/heads/{pr.base}") or ""
        since = pr.pre_merge_base or base_sha
        commits = int(_git(repo.path, "rev-list", "--count", f"{since}..{head_sha}", check=False).stdout.decode().strip() or 0)
        out = {
            "commits": commits,
            "id": pr.id, "node_id": f"PR_{repo.id}_{pr.number}", "number": pr.number, "state": pr.state,
            "title": pr.title, "body": pr.body, "draft": pr.draft, "user": self._user(pr.user),
            "url": f"{api}/pulls/{pr.number}", "html_url": f"{self.web_url}/{full}/pull/{pr.number}",
            "issue_url": f"{api}/issues/{pr.number}", "comments_url": f"{api}/issues/{pr.number}/comments",
            "statuses_url": f"{api}/statuses/{head_sha}",
            "head": {"ref": pr.head, "sha": head_sha, "label": f"{pr.head_owner or repo.owner}:{pr.head}",
                     "repo": ({**self._repo_json(repo), "full_name": f"{pr.head_owner}/{repo.name}", "fork": True,
                               "owner": self._user(pr.head_owner)} if pr.head_owner else self._repo_json(repo)),
                     "user": self._user(pr.head_owner or repo.owner)},
            "base": {"ref": pr.base, "sha": base_sha, "label": f"{repo.owner}:{pr.base}", "repo": self._repo_json(repo),
                     "user": self._user(repo.owner)},
            "merged": pr.merged, "merge_commit_sha": pr.merge_commit_sha, "mergeable": mergeable,
            "mergeable_state": mergeable_state, "labels": [self._label_json(repo, name) for name in pr.labels],
            "requested_reviewers": [self._user(u) for u in pr.reviewers],
            "requested_teams": [{"slug": t, "name": t, "id": next(self._ids)} for t in pr.team_reviewers],
            "created_at": _iso(pr.created), "updated_at": _iso(),
            "merged_at": _iso(pr.created) if pr.merged else None,
        }
        if not full:
            for key in ("merged", "mergeable", "mergeable_state", "commits"):
                out.pop(key)
        return out

    def _label_json(self, repo: Repo, name: str) -> dict[str, Any]:
        return {"id": int(hashlib.sha256(name.encode()).hexdigest()[:6], 16), "name": name, "color": "ededed",
                "url": f"{self.api_url}/repos/{repo.owner}/{repo.name}/labels/{urllib.parse.quote(name)}"}

    def _check_run_json(self, repo: Repo, sha: str, check: Check) -> dict[str, Any]:
        done = check.state in CHECK_CONCLUSIONS
        return {
            "id": check.id, "name": check.name, "head_sha": sha, "status": "completed" if done else check.state,
            "conclusion": check.state if done else None, "html_url": check.url, "details_url": check.url,
            "url": f"{self.api_url}/repos/{repo.owner}/{repo.name}/check-runs/{check.id}",
            "started_at": _iso(check.at), "completed_at": _iso(check.at) if done else None,
            "output": {"title": None, "summary": None, "text": None, "annotations_count": 0},
        }

    def _status_json(self, repo: Repo, check: Check) -> dict[str, Any]:
        return {"id": check.id, "context": check.name, "state": check.state, "target_url": check.url,
                "description": "", "created_at": _iso(check.at), "updated_at": _iso(check.at),
                "url": f"{self.api_url}/repos/{repo.owner}/{repo.name}/statuses/{check.id}"}

    # ---- auth --------------------------------------------------------------------------

    def _authenticate(self, header: str | None, path: str) -> TokenInfo | str:
        """A TokenInfo for tokens, the string "app" for a valid App JWT. Raises 401."""
        if not header:
            raise ApiError(401, "Requires authentication")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.count(".") == 2 and self.app_public_key:
            try:
                claims = jwt.decode(value, self.app_public_key, algorithms=["RS256"], options={"require": ["exp", "iat", "iss"]})
            except jwt.PyJWTError as exc:
                raise ApiError(401, f"A JSON web token could not be decoded ({exc})") from None
            if str(claims["iss"]) != self.app_id:
                raise ApiError(401, "Integration not found")
            if not (path.startswith("/app") or path.endswith("/installation")):
                raise ApiError(403, "A JSON web token cannot be used for this endpoint; use an installation token")
            return "app"
        if scheme.lower() not in {"token", "bearer"}:
            raise ApiError(401, "Bad credentials")
        info = self.tokens.get(value)
        if info is None or (info.expires_at is not None and info.expires_at <= time.time()):
            raise ApiError(401, "Bad credentials")
        return info

    # ---- git plumbing ------------------------------------------------------------------

    def _commit_tree(self, repo: Repo, tree: str, parents: list[str], message: str) -> str:
        args = ["commit-tree", tree]
        for parent in parents:
            args += ["-p", parent]
        return _git(repo.path, *args, input=message.encode()).stdout.decode().strip()

    def _replay(self, repo: Repo, onto: str, old: str, new: str) -> str | None:
        """Tree of `onto` plus the change old..new (3-way, private index); None on conflict.
        (`git merge-tree --merge-base` needs git 2.40; this works with older git too.)"""
        diff = _git(repo.path, "diff", "--binary", "--no-renames", old, new).stdout
        if not diff.strip():
            return _git(repo.path, "rev-parse", f"{onto}^{{tree}}").stdout.decode().strip()
        index = repo.path / f"emu-index-{threading.get_ident()}"
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            _git(repo.path, "read-tree", onto, env=env)
            if _git(repo.path, "apply", "--cached", "--3way", "--binary", "-", input=diff, env=env, check=False).returncode:
                return None
            proc = _git(repo.path, "write-tree", env=env, check=False)
            return proc.stdout.decode().strip() if proc.returncode == 0 else None
        finally:
            index.unlink(missing_ok=True)

    def _update_ref(self, repo: Repo, branch: str, new: str, old: str) -> None:
        proc = _git(repo.path, "update-ref", f"refs/heads/{branch}", new, old, check=False)
        if proc.returncode != 0:
            raise ApiError(409, "Reference update failed: the branch moved; try again")

    def do_merge(self, repo: Repo, pr: Pull, sha: str | None, method: str, title: str | None, message: str | None) -> str:
        if pr.merged or pr.state != "open":
            raise ApiError(405, "Pull Request is not mergeable")
        head = self._pull_head_sha(repo, pr)
        if sha and sha != head:
            raise ApiError(409, "Head branch was modified. Review and try the merge again.")
        base = self._commit_sha(repo, f"refs/heads/{pr.base}")
        assert base is not None
        if not self._required_green(repo, head):
            raise ApiError(405, "Required status check(s) are expected or failing: " + ", ".join(repo.required_checks))
        proc = _git(repo.path, "merge-tree", "--write-tree", base, head, check=False)
        if proc.returncode != 0:
            raise ApiError(405, "Pull Request is not mergeable")
        tree = proc.stdout.decode().split()[0]
        if method == "merge":
            subject = title or f"Merge pull request #{pr.number} from {repo.owner}/{pr.head}"
            new = self._commit_tree(repo, tree, [base, head], f"{subject}\n\n{message or pr.title}\n")
        elif method == "squash":
            subject = title or f"{pr.title} (#{pr.number})"
            new = self._commit_tree(repo, tree, [base], f"{subject}\n\n{message or ''}\n")
        elif method == "rebase":
            commits = _git(repo.path, "rev-list", "--reverse", f"{base}..{head}").stdout.decode().split()
            new = base
            for commit in commits:
                tree = self._replay(repo, new, f"{commit}^", commit)
                if tree is None:
                    raise ApiError(405, "This branch can't be rebased")
                msg = _git(repo.path, "log", "-1", "--format=%B", commit).stdout.decode()
                new = self._commit_tree(repo, tree, [new], msg)
        else:
            raise ApiError(422, f"Invalid merge_method {method!r}")
        self._update_ref(repo, pr.base, new, base)
        pr.merged, pr.state, pr.merge_commit_sha, pr.pre_merge_base, pr.head_sha = True, "closed", new, base, head
        return new

    def _revert_commit(self, repo: Repo, pr: Pull, branch: str) -> str:
        """Create `branch` off the base head with a commit undoing `pr`'s merge."""
        base = self._commit_sha(repo, f"refs/heads/{pr.base}")
        assert base and pr.merge_commit_sha
        tree = self._replay(repo, base, pr.merge_commit_sha, pr.pre_merge_base)
        if tree is None:
            raise ApiError(422, "This pull request can't be reverted automatically")
        sha = self._commit_tree(repo, tree, [base],
                                f'Revert "{pr.title}"\n\nThis reverts commit {pr.merge_commit_sha}.\n')
        _git(repo.path, "update-ref", f"refs/heads/{branch}", sha)
        return sha

    def _create_pull(self, repo: Repo, login: str, title: str, body: str, head: str, base: str, draft: bool = False) -> Pull:
        head_ref = head.split(":", 1)[-1]
        head_sha = self._commit_sha(repo, f"refs/heads/{head_ref}")
        if head_sha is None:
            raise ApiError(422, "Validation Failed", errors=[{"resource": "PullRequest", "field": "head", "code": "invalid"}])
        if self._commit_sha(repo, f"refs/heads/{base}") is None:
            raise ApiError(422, "Validation Failed", errors=[{"resource": "PullRequest", "field": "base", "code": "invalid"}])
        for existing in repo.pulls.values():
            if existing.state == "open" and existing.head == head_ref and existing.base == base:
                raise ApiError(422, "Validation Failed", errors=[{"resource": "PullRequest", "code": "custom",
                               "message": f"A pull request already exists for {repo.owner}:{head_ref}."}])
        number = next(self._numbers[(repo.owner, repo.name)])
        pr = Pull(number=number, id=next(self._ids), title=title, body=body or "", head=head_ref, base=base,
                  user=login, head_sha=head_sha, draft=draft)
        repo.pulls[number] = pr
        return pr


class _Handler(BaseHTTPRequestHandler):
    emu: GitHubEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ---- plumbing ----------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None) -> None:
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        all_headers = {"Content-Type": "application/json; charset=utf-8", "X-RateLimit-Limit": "5000",
                       "X-RateLimit-Remaining": "4999", "X-RateLimit-Reset": str(int(time.time()) + 3600)}
        all_headers.update(headers or {})
        for key, value in all_headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        query = urllib.parse.parse_qs(parsed.query)
        body = self._body()
        emu = self.emu
        status = 500
        try:
            if re.match(r"^/[^/]+/[^/]+\.git/", path):
                status = self._git_http(path, parsed.query, body)
                return
            with emu._lock:
                for fault in list(emu.faults):
                    if fault.path_re.search(path) and (fault.method in (None, self.command)):
                        fault.times -= 1
                        if fault.times <= 0:
                            emu.faults.remove(fault)
                        raise ApiError(fault.status, fault.message, fault.headers)
            if path.startswith("/api/v3/"):
                api_path = path[len("/api/v3"):]
            elif path == "/api/graphql":
                api_path = "/graphql"
            else:
                raise ApiError(404, "Not Found")
            data = json.loads(body) if body else {}
            with emu._lock:
                auth = emu._authenticate(self.headers.get("Authorization"), api_path)
                status, payload = _route(emu, self.command, api_path, query, data, auth)
            self._send(status, payload)
        except ApiError as exc:
            status = exc.status
            payload = {"message": exc.message, "documentation_url": "https://docs.github.com/rest"}
            if exc.errors:
                payload["errors"] = exc.errors
            self._send(exc.status, payload, exc.headers)
        finally:
            with emu._lock:
                emu.requests.append((self.command, path, status))

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _dispatch

    def _git_http(self, path: str, query: str, body: bytes) -> int:
        """Smart HTTP through `git http-backend`; Basic auth with a token as the password, like GitHub."""
        match = re.match(r"^/([^/]+)/([^/]+)\.git(/.*)$", path)
        assert match
        owner, name, rest = match.groups()
        emu = self.emu
        with emu._lock:
            repo = emu.repos.get((owner, name))
            header = self.headers.get("Authorization", "")
            info: TokenInfo | None = None
            if header.lower().startswith("basic "):
                user, _, secret = base64.b64decode(header[6:]).decode().partition(":")
                info = emu.tokens.get(secret)
                if info and info.expires_at is not None and info.expires_at <= time.time():
                    info = None
                if info:
                    emu.git_auth.append(user)
        if info is None:
            self._send(401, raw=b"Authentication failed\n", headers={"WWW-Authenticate": 'Basic realm="GitHub"',
                                                                       "Content-Type": "text/plain"})
            return 401
        if repo is None:
            self._send(404, raw=b"Repository not found.\n", headers={"Content-Type": "text/plain"})
            return 404
        pushing = "git-receive-pack" in rest or "service=git-receive-pack" in query
        if pushing and info.permission != "write":
            self._send(403, raw=f"Permission to {owner}/{name}.git denied to {info.login}.\n".encode(),
                       headers={"Content-Type": "text/plain"})
            return 403
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(
            GIT_HTTP_EXPORT_ALL="1", PATH_TRANSLATED=str(repo.path) + rest, PATH_INFO=rest, REMOTE_USER=info.login,
            REMOTE_ADDR="127.0.0.1", REQUEST_METHOD=self.command, QUERY_STRING=query,
            CONTENT_TYPE=self.headers.get("Content-Type", ""), CONTENT_LENGTH=str(len(body)),
            GATEWAY_INTERFACE="CGI/1.1", SERVER_PROTOCOL="HTTP/1.1",
        )
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        proc = subprocess.run([GIT_HTTP_BACKEND], input=body, capture_output=True, env=env)
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode(errors="replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers[key.strip()] = value.strip()
        self._send(status, raw=payload, headers=headers)
        return status


# ---- REST routes -----------------------------------------------------------------------


def _need_write(auth: TokenInfo | str, repo: Repo, what: str) -> None:
    if isinstance(auth, TokenInfo) and auth.permission != "write":
        by = "integration" if auth.installation_id is not None else "personal access token"
        raise ApiError(403, f"Resource not accessible by {by} ({what} on {repo.owner}/{repo.name})")


def _route(emu: GitHubEmulator, method: str, path: str, query: dict[str, list[str]], data: dict[str, Any],
           auth: TokenInfo | str) -> tuple[int, Any]:
    q = {k: v[0] for k, v in query.items()}

    # -- GitHub App -----------------------------------------------------------------------
    if auth == "app":
        if m := re.fullmatch(r"/repos/([^/]+)/([^/]+)/installation", path):
            repo = emu.repos.get((m[1], m[2]))
            if repo is None or repo.installation_id is None:
                raise ApiError(404, "Not Found")
            return 200, {"id": repo.installation_id, "app_id": int(emu.app_id or 0), "target_type": "Organization",
                         "account": emu._user(repo.owner), "permissions": {"contents": "write", "pull_requests": "write",
                         "checks": "read", "statuses": "read", "issues": "write"},
                         "access_tokens_url": f"{emu.api_url}/app/installations/{repo.installation_id}/access_tokens",
                         "repository_selection": "selected", "html_url": f"{emu.web_url}/settings/installations/{repo.installation_id}"}
        if (m := re.fullmatch(r"/app/installations/(\d+)/access_tokens", path)) and method == "POST":
            token = "ghs_" + hashlib.sha256(os.urandom(16)).hexdigest()[:36]
            expires = time.time() + emu.installation_token_ttl
            emu.tokens[token] = TokenInfo(login=f"app-{emu.app_id}[bot]", permission="write", expires_at=expires,
                                          installation_id=int(m[1]))
            emu.tokens_issued += 1
            return 201, {"token": token, "expires_at": _iso(expires), "permissions": {"contents": "write"},
                         "repository_selection": "selected"}
        raise ApiError(404, "Not Found")
    assert isinstance(auth, TokenInfo)

    if path == "/graphql" and method == "POST":
        return _graphql(emu, data, auth)
    if path == "/user":
        return 200, emu._user(auth.login)

    m = re.fullmatch(r"/repos/([^/]+)/([^/]+)(/.*)?", path)
    if not m:
        raise ApiError(404, "Not Found")
    repo = emu.repos.get((m[1], m[2]))
    if repo is None:
        raise ApiError(404, "Not Found")
    if auth.installation_id is not None and repo.installation_id != auth.installation_id:
        raise ApiError(404, "Not Found")
    rest = m[3] or ""
    api = f"{emu.api_url}/repos/{repo.owner}/{repo.name}"

    if rest == "" and method == "GET":
        return 200, emu._repo_json(repo)

    if (mm := re.fullmatch(r"/branches/(.+)", rest)) and method == "GET":
        sha = emu._commit_sha(repo, f"refs/heads/{mm[1]}")
        if sha is None:
            raise ApiError(404, "Branch not found")
        return 200, {"name": mm[1], "protected": bool(repo.required_checks),
                     "commit": {"sha": sha, "url": f"{api}/commits/{sha}"}, "_links": {"self": f"{api}/branches/{mm[1]}"}}

    if (mm := re.fullmatch(r"/git/(?:ref|refs)/heads/(.+)", rest)):
        ref = f"refs/heads/{mm[1]}"
        if method == "GET":
            sha = emu._commit_sha(repo, ref)
            if sha is None:
                raise ApiError(404, "Not Found")
            return 200, {"ref": ref, "url": f"{api}/git/refs/heads/{mm[1]}", "object": {"sha": sha, "type": "commit",
                         "url": f"{api}/git/commits/{sha}"}}
        if method == "DELETE":
            _need_write(auth, repo, "delete a branch")
            if emu._commit_sha(repo, ref) is None:
                raise ApiError(422, "Reference does not exist")
            _git(repo.path, "update-ref", "-d", ref)
            return 204, None

    if (mm := re.fullmatch(r"/contents/(.*)", rest)) and method == "GET":
        ref = q.get("ref") or repo.default_branch
        rel = urllib.parse.unquote(mm[1]).strip("/")
        kind = _git(repo.path, "cat-file", "-t", f"{ref}:{rel}", check=False).stdout.decode().strip()
        if kind == "blob":
            content = _git(repo.path, "cat-file", "blob", f"{ref}:{rel}").stdout
            blob = _git(repo.path, "rev-parse", f"{ref}:{rel}").stdout.decode().strip()
            big = len(content) > 1024 * 1024  # like GitHub: no inline content above 1 MB
            return 200, {"type": "file", "name": rel.rsplit("/", 1)[-1], "path": rel, "sha": blob, "size": len(content),
                         "encoding": "none" if big else "base64",
                         "content": "" if big else base64.encodebytes(content).decode(),
                         "url": f"{api}/contents/{rel}?ref={ref}", "git_url": f"{api}/git/blobs/{blob}",
                         "html_url": f"{emu.web_url}/{repo.owner}/{repo.name}/blob/{ref}/{rel}"}
        if kind == "tree":
            entries = _git(repo.path, "ls-tree", f"{ref}:{rel}" if rel else ref).stdout.decode().splitlines()
            out = []
            for line in entries:
                meta, name = line.split("\t", 1)
                _, typ, sha = meta.split()
                p = f"{rel}/{name}" if rel else name
                out.append({"type": "dir" if typ == "tree" else "file", "name": name, "path": p, "sha": sha,
                            "url": f"{api}/contents/{p}?ref={ref}"})
            return 200, out
        raise ApiError(404, "Not Found")

    if (mm := re.fullmatch(r"/git/blobs/([0-9a-f]{40})", rest)) and method == "GET":
        proc = _git(repo.path, "cat-file", "blob", mm[1], check=False)
        if proc.returncode != 0:
            raise ApiError(404, "Not Found")
        return 200, {"sha": mm[1], "size": len(proc.stdout), "encoding": "base64",
                     "content": base64.encodebytes(proc.stdout).decode(), "url": f"{api}/git/blobs/{mm[1]}"}

    if (mm := re.fullmatch(r"/commits/([^/]+)/status", rest)) and method == "GET":
        sha = emu._commit_sha(repo, mm[1]) or mm[1]
        statuses = list(emu._latest_checks(sha, "status").values())
        states = {s.state for s in statuses}
        combined = ("failure" if states & {"failure", "error"} else "pending" if "pending" in states or not statuses
                    else "success")
        return 200, {"state": combined, "sha": sha, "total_count": len(statuses),
                     "statuses": [emu._status_json(repo, s) for s in statuses], "repository": emu._repo_json(repo),
                     "commit_url": f"{api}/commits/{sha}", "url": f"{api}/commits/{sha}/status"}

    if (mm := re.fullmatch(r"/commits/([^/]+)/check-runs", rest)) and method == "GET":
        sha = emu._commit_sha(repo, mm[1]) or mm[1]
        runs = list(emu._latest_checks(sha, "check").values())
        return 200, {"total_count": len(runs), "check_runs": [emu._check_run_json(repo, sha, c) for c in runs]}

    if (mm := re.fullmatch(r"/statuses/([0-9a-f]{40})", rest)) and method == "POST":
        _need_write(auth, repo, "create a commit status")
        emu.set_check(mm[1], data.get("context", "default"), data["state"], kind="status", url=data.get("target_url", ""))
        return 201, emu._status_json(repo, emu.checks[mm[1]][-1])

    if (mm := re.fullmatch(r"/commits/([^/]+)/pulls", rest)) and method == "GET":
        sha = emu._commit_sha(repo, mm[1]) or mm[1]
        found = [p for p in repo.pulls.values() if p.merge_commit_sha == sha or emu._pull_head_sha(repo, p) == sha]
        return 200, [emu._pull_json(repo, p, full=False) for p in found]

    if (mm := re.fullmatch(r"/commits/([^/]+)", rest)) and method == "GET":
        sha = emu._commit_sha(repo, mm[1])
        if sha is None:
            raise ApiError(422, f"No commit found for SHA: {mm[1]}")
        return 200, _commit_json(emu, repo, sha)

    if rest == "/pulls" and method == "GET":
        state = q.get("state", "open")
        head = q.get("head", "")
        head_ref = head.split(":", 1)[-1] if head else None
        out = [p for p in sorted(repo.pulls.values(), key=lambda p: -p.number)
               if (state == "all" or p.state == state) and (head_ref is None or p.head == head_ref)
               and (not q.get("base") or p.base == q["base"])]
        return 200, [emu._pull_json(repo, p, full=False) for p in out]

    if rest == "/pulls" and method == "POST":
        _need_write(auth, repo, "create a pull request")
        pr = emu._create_pull(repo, auth.login, data.get("title", ""), data.get("body") or "", data["head"],
                              data["base"], bool(data.get("draft")))
        return 201, emu._pull_json(repo, pr)

    if mm := re.fullmatch(r"/(?:pulls|issues)/(\d+)(/.*)?", rest):
        number, sub = int(mm[1]), mm[2] or ""
        pr = repo.pulls.get(number)
        if pr is None:
            raise ApiError(404, "Not Found")
        if sub == "" and method == "GET":
            return 200, emu._pull_json(repo, pr)
        if sub == "" and method == "PATCH":
            _need_write(auth, repo, "update a pull request")
            if "state" in data:
                if pr.merged and data["state"] == "open":
                    raise ApiError(422, "Validation Failed")
                pr.state = data["state"]
            pr.title = data.get("title", pr.title)
            pr.body = data.get("body", pr.body)
            return 200, emu._pull_json(repo, pr)
        if sub == "/merge" and method == "PUT":
            _need_write(auth, repo, "merge a pull request")
            sha = emu.do_merge(repo, pr, data.get("sha"), data.get("merge_method", "merge"), data.get("commit_title"),
                               data.get("commit_message"))
            return 200, {"sha": sha, "merged": True, "message": "Pull Request successfully merged"}
        if sub == "/merge" and method == "GET":
            if pr.merged:
                return 204, None
            raise ApiError(404, "Not Found")
        if sub == "/labels" and method == "POST":
            _need_write(auth, repo, "add labels")
            names = data.get("labels", data) if isinstance(data, dict) else data
            for name in names:
                repo.labels.add(name)
                if name not in pr.labels:
                    pr.labels.append(name)
            return 200, [emu._label_json(repo, n) for n in pr.labels]
        if sub == "/requested_reviewers" and method == "POST":
            _need_write(auth, repo, "request reviewers")
            users = data.get("reviewers") or []
            if pr.user in users:
                raise ApiError(422, "Review cannot be requested from pull request author.")
            pr.reviewers += [u for u in users if u not in pr.reviewers]
            pr.team_reviewers += [t for t in data.get("team_reviewers") or [] if t not in pr.team_reviewers]
            return 201, emu._pull_json(repo, pr)
        if sub == "/comments" and method == "GET":
            return 200, pr.comments
        if sub == "/comments" and method == "POST":
            _need_write(auth, repo, "comment")
            text = data.get("body", "")
            if len(text) > 65536:
                raise ApiError(422, "Validation Failed", errors=[{"resource": "IssueComment", "code": "custom",
                               "field": "body", "message": "body is too long (maximum is 65536 characters)"}])
            cid = next(emu._ids)
            comment = {"id": cid, "body": text, "user": emu._user(auth.login), "created_at": _iso(), "updated_at": _iso(),
                       "url": f"{api}/issues/comments/{cid}",
                       "html_url": f"{emu.web_url}/{repo.owner}/{repo.name}/pull/{number}#issuecomment-{cid}"}
            pr.comments.append(comment)
            return 201, comment
        if sub == "/commits" and method == "GET":
            base = pr.pre_merge_base or emu._commit_sha(repo, f"refs/heads/{pr.base}")
            shas = _git(repo.path, "rev-list", "--reverse", f"{base}..{pr.head_sha}").stdout.decode().split()
            return 200, [_commit_json(emu, repo, s) for s in shas]
    raise ApiError(404, "Not Found")


def _commit_json(emu: GitHubEmulator, repo: Repo, sha: str) -> dict[str, Any]:
    api = f"{emu.api_url}/repos/{repo.owner}/{repo.name}"
    fmt = _git(repo.path, "log", "-1", "--format=%an%x00%ae%x00%aI%x00%P%x00%B", sha).stdout.decode()
    name, email, date, parents, message = fmt.split("\x00", 4)
    return {"sha": sha, "node_id": f"C_{sha}", "url": f"{api}/commits/{sha}",
            "html_url": f"{emu.web_url}/{repo.owner}/{repo.name}/commit/{sha}",
            "commit": {"message": message.rstrip("\n"), "author": {"name": name, "email": email, "date": date},
                       "committer": {"name": name, "email": email, "date": date}, "url": f"{api}/git/commits/{sha}"},
            "parents": [{"sha": p, "url": f"{api}/commits/{p}"} for p in parents.split()]}


def _graphql(emu: GitHubEmulator, data: dict[str, Any], auth: TokenInfo) -> tuple[int, Any]:
    query = data.get("query", "")
    variables = data.get("variables") or {}
    if "revertPullRequest" not in query:
        return 200, {"errors": [{"message": "This emulator only implements the revertPullRequest mutation"}]}
    if not emu.graphql_revert:  # an older GitHub Enterprise Server without the mutation
        return 200, {"errors": [{"message": "Field 'revertPullRequest' doesn't exist on type 'Mutation'",
                                 "extensions": {"code": "undefinedField", "typeName": "Mutation",
                                                "fieldName": "revertPullRequest"}}]}
    inp = variables.get("input") or {}
    node = inp.get("pullRequestId", "")
    mm = re.fullmatch(r"PR_(\d+)_(\d+)", node)
    repo = next((r for r in emu.repos.values() if mm and r.id == int(mm[1])), None)
    pr = repo.pulls.get(int(mm[2])) if repo and mm else None
    if repo is None or pr is None:
        return 200, {"errors": [{"type": "NOT_FOUND", "message": f"Could not resolve to a node with the global id of '{node}'"}]}
    if auth.permission != "write":
        return 200, {"errors": [{"type": "FORBIDDEN", "message": "Resource not accessible by integration"}]}
    if not pr.merged:
        return 200, {"errors": [{"type": "UNPROCESSABLE", "message": "Pull request is not merged"}]}
    branch = f"revert-{pr.number}-{pr.head}"
    suffix = 1
    while emu._commit_sha(repo, f"refs/heads/{branch}"):
        suffix += 1
        branch = f"revert-{pr.number}-{pr.head}-{suffix}"
    try:
        emu._revert_commit(repo, pr, branch)
    except ApiError as exc:
        return 200, {"errors": [{"type": "UNPROCESSABLE", "message": exc.message}]}
    revert = emu._create_pull(repo, auth.login, inp.get("title") or f'Revert "{pr.title}"',
                              inp.get("body") or f"Reverts {repo.owner}/{repo.name}#{pr.number}", branch, pr.base,
                              bool(inp.get("draft")))
    full = f"{repo.owner}/{repo.name}"
    return 200, {"data": {"revertPullRequest": {
        "pullRequest": {"id": node, "number": pr.number},
        "revertPullRequest": {"id": f"PR_{repo.id}_{revert.number}", "number": revert.number,
                              "url": f"{emu.web_url}/{full}/pull/{revert.number}", "headRefName": branch,
                              "headRefOid": revert.head_sha},
    }}}


# ---- helpers for tests -----------------------------------------------------------------


def make_bare_repo(root: Path, name: str, files: dict[str, str], branch: str = "main") -> tuple[Path, str]:
    """A bare repository with one commit holding `files`; returns (path, sha)."""
    work = root / f"{name}-seed"
    bare = root / f"{name}.git"
    subprocess.run(["git", "init", "-q", "-b", branch, str(work)], check=True)
    for rel, text in files.items():
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    env = {**os.environ, "GIT_AUTHOR_NAME": "Seed", "GIT_AUTHOR_EMAIL": "seed@example.com",
           "GIT_COMMITTER_NAME": "Seed", "GIT_COMMITTER_EMAIL": "seed@example.com"}
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-q", "-m", "initial"], check=True, env=env)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    sha = subprocess.run(["git", "-C", str(bare), "rev-parse", branch], check=True, capture_output=True, text=True).stdout.strip()
    return bare, sha


def push_commit(bare: Path, branch: str, files: dict[str, str], message: str, tmp: Path) -> str:
    """Commit `files` on top of `branch` in `bare` (like someone else pushing); returns the new sha."""
    work = tmp / f"pusher-{next(_pusher_ids)}"
    subprocess.run(["git", "clone", "-q", "-b", branch, str(bare), str(work)], check=True)
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    env = {**os.environ, "GIT_AUTHOR_NAME": "Other", "GIT_AUTHOR_EMAIL": "other@example.com",
           "GIT_COMMITTER_NAME": "Other", "GIT_COMMITTER_EMAIL": "other@example.com"}
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", message], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", branch], check=True, env=env)
    return subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


_pusher_ids = itertools.count(1)

try:  # the pytest fixture, importable by any test module or conftest
    import pytest

    @pytest.fixture
    def github_emulator():
        emu = GitHubEmulator().start()
        try:
            yield emu
        finally:
            emu.stop()
except ImportError:  # pragma: no cover - used outside pytest
    pass
