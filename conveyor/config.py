"""Conveyor's own configuration: environment (CONVEYOR_*) plus conveyor.toml with repo policies.

Trusted input only. Repo policies live here, never in the target repository, so a change
cannot rewrite the policy it is reviewed under.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A configuration problem, phrased for the operator (names the key and line)."""


_DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9-]+\.)+[a-z0-9-]+$")


class SandboxPolicy(BaseModel):
    """What a sandboxed run may use. Policy only: the backends turn it into mechanism."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "modal"] = "local"
    allow_domains: list[str] = Field(default_factory=list)
    """Egress allowlist: exact names and `*.example.com` wildcards. Empty = no network."""
    allow_ports: list[int] = Field(default_factory=lambda: [443])
    setup_command: str = ""
    """The repo's own dependency install step, run before the agent under the same limits."""
    setup_allow_domains: list[str] = Field(default_factory=list)
    """Package registries reachable during setup only (unless also in allow_domains)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra non-secret environment for the run; nothing is inherited from the worker."""
    secrets: list[str] = Field(default_factory=list)
    """Names of secrets the run may use (Modal secrets / host-side credential endpoints)."""
    cpus: float = 1.0
    memory_mb: int = 2048
    pids: int = 512
    disk_mb: int = 2048
    tmp_mb: int = 512
    wall_clock_s: int = 1800
    output_cap_bytes: int = 8 * 1024 * 1024
    image: str = ""
    """Modal image reference for this repo's profile (ignored by the local backend)."""
    tool_paths: list[str] = Field(default_factory=list)
    """Host directories bound read-only into the local sandbox, for agent CLIs installed outside
    /usr (e.g. /opt/claude). Never a home directory or anything holding credentials."""

    @field_validator("tool_paths")
    @classmethod
    def _tool_paths_ok(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.startswith("/") or path.rstrip("/") in ("", "/root", "/home", "/etc", "/proc", "/sys"):
                raise ValueError(f"tool path {path!r} must be an absolute directory other than /, /etc, /root or /home")
        return paths

    @field_validator("allow_domains", "setup_allow_domains")
    @classmethod
    def _domains_ok(cls, domains: list[str]) -> list[str]:
        cleaned = []
        for raw in domains:
            name = raw.strip().lower().rstrip(".")
            if not _DOMAIN_RE.match(name):
                raise ValueError(f"{raw!r} is not a domain name or *.domain wildcard")
            if name.startswith("*.") and name.count(".") < 2:
                raise ValueError(f"{raw!r} is too broad: a wildcard must name at least a registrable domain")
            cleaned.append(name)
        return cleaned

    @field_validator("allow_ports")
    @classmethod
    def _ports_ok(cls, ports: list[int]) -> list[int]:
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range")
        return ports


class RepoPolicy(BaseModel):
    """One `[repos.NAME]` table of conveyor.toml."""

    model_config = ConfigDict(extra="forbid")

    name: str
    url: str
    """A local path (bare or working repository) or an https URL."""
    host: Literal["local", "github"] = "local"
    base: str = "main"
    agent: str = "command"
    agent_command: str = ""
    """For agent `command` started from a trigger with no command text (Slack, Linear)."""
    test_command: str = ""
    invokers: list[str] = Field(default_factory=list)
    approvers: list[str] = Field(default_factory=list)
    reverters: list[str] = Field(default_factory=list)
    approver_must_differ: bool = False
    review_timeout_s: int = 72 * 3600
    revert_window_s: int = 7 * 24 * 3600
    checks_timeout_s: int = 6 * 3600
    required_checks: list[str] = Field(default_factory=list)
    """Code-host checks that must be green before merge (GitHub). Empty = none required."""
    merge_method: Literal["merge", "squash", "rebase"] = "merge"
    labels: list[str] = Field(default_factory=list)
    reviewers: list[str] = Field(default_factory=list)
    max_files_changed: int = 200
    max_diff_lines: int = 5000
    max_patch_bytes: int = 5 * 1024 * 1024
    max_turns: int = 50
    max_cost_usd: float = 5.0
    ci_fix_tasks: bool = False
    """GitHub: a failing check suite on the default branch starts a 'fix the failing CI' task."""
    slack_channels: list[str] = Field(default_factory=list)
    """Slack channels whose default repo this is."""
    linear_team: str = ""
    linear_users: dict[str, str] = Field(default_factory=dict)
    """Linear user id or email -> policy principal (e.g. "slack:U123"), so a person is one
    identity across triggers. Unmapped Linear users act as "linear:<user id>"."""
    sandbox: SandboxPolicy = Field(default_factory=SandboxPolicy)

    def allows(self, role: Literal["invokers", "approvers", "reverters"], principal: str, bare_id: str) -> bool:
        """Pure policy check, safe to call from workflow code."""
        entries = getattr(self, role)
        # A bare entry ("U123ABC") is a Slack user id, as documented. Matching it against any
        # kind would let a GitHub login or a local user named "U123ABC" act as that person.
        bare_ok = principal == f"slack:{bare_id}" and ":" not in bare_id
        return "*" in entries or principal in entries or (bare_ok and bare_id in entries)


class SlackSettings(BaseModel):
    bot_token: str = ""
    signing_secret: str = ""
    app_token: str = ""
    api_url: str = ""


class GitHubSettings(BaseModel):
    token: str = ""
    app_id: str = ""
    app_private_key: str = ""
    api_url: str = "https://api.github.com"
    webhook_secret: str = ""


class LinearSettings(BaseModel):
    api_key: str = ""
    webhook_secret: str = ""
    api_url: str = "https://api.linear.app/graphql"
    label: str = "agent"


class Settings(BaseSettings):
    """CONVEYOR_* environment. Service tokens use their conventional names (SLACK_BOT_TOKEN...)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".conveyor")
    config: Path | None = None
    task_queue: str = "conveyor"
    namespace: str = "default"
    temporal_address: str = ""
    """Empty = TEMPORAL_ADDRESS via temporalio.envconfig, else the embedded server."""
    temporal_port: int = 7233
    ui_port: int = 8233
    ui_url: str = ""
    """Base URL of the Temporal Web UI used in links (defaults to the embedded UI)."""
    bot_name: str = "Conveyor"
    bot_email: str = "conveyor@localhost"

    @property
    def ui_base(self) -> str:
        return self.ui_url or f"http://127.0.0.1:{self.ui_port}"

    def task_ui_url(self, task_id: str) -> str:
        return f"{self.ui_base}/namespaces/{self.namespace}/workflows/{task_id}"

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def workspaces_dir(self) -> Path:
        return self.home / "workspaces"

    @property
    def db_file(self) -> Path:
        return self.home / "temporal.db"

    def slack(self) -> SlackSettings:
        return SlackSettings(
            bot_token=os.environ.get("SLACK_BOT_TOKEN", ""),
            signing_secret=os.environ.get("SLACK_SIGNING_SECRET", ""),
            app_token=os.environ.get("SLACK_APP_TOKEN", ""),
            api_url=os.environ.get("SLACK_API_URL", ""),
        )

    def github(self) -> GitHubSettings:
        return GitHubSettings(
            token=os.environ.get("GITHUB_TOKEN", ""),
            app_id=os.environ.get("GITHUB_APP_ID", ""),
            app_private_key=os.environ.get("GITHUB_APP_PRIVATE_KEY", ""),
            api_url=os.environ.get("GITHUB_API_URL", "https://api.github.com"),
            webhook_secret=os.environ.get("GITHUB_WEBHOOK_SECRET", ""),
        )

    def linear(self) -> LinearSettings:
        return LinearSettings(
            api_key=os.environ.get("LINEAR_API_KEY", ""),
            webhook_secret=os.environ.get("LINEAR_WEBHOOK_SECRET", ""),
            api_url=os.environ.get("LINEAR_API_URL", "https://api.linear.app/graphql"),
        )


class ConveyorConfig(BaseModel):
    """The parsed conveyor.toml."""

    repos: dict[str, RepoPolicy] = Field(default_factory=dict)
    source: Path | None = None

    def repo(self, name: str) -> RepoPolicy:
        try:
            return self.repos[name]
        except KeyError:
            known = ", ".join(sorted(self.repos)) or "none configured"
            raise ConfigError(f"unknown repository {name!r} (known: {known})") from None

    def repo_for_channel(self, channel: str) -> RepoPolicy | None:
        for policy in self.repos.values():
            if channel in policy.slack_channels:
                return policy
        return None

    def repo_for_url(self, url: str) -> RepoPolicy | None:
        for policy in self.repos.values():
            if policy.url.rstrip("/").removesuffix(".git") == url.rstrip("/").removesuffix(".git"):
                return policy
        return None


def local_user() -> str:
    """The OS account running the CLI. Not getpass.getuser(): that reads LOGNAME/USER first, so
    `USER=alice conveyor approve` would act as alice (e.g. approve one's own task)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):  # no passwd entry (containers)
        return str(os.geteuid())


def adhoc_repo_policy(path_or_url: str, base: str | None = None) -> RepoPolicy:
    """Default local policy for `conveyor run --repo PATH` with no config: the local user may
    invoke, approve and revert."""
    if "://" in path_or_url or path_or_url.startswith("git@"):
        url = path_or_url
        name = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1])
    else:
        path = Path(path_or_url).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"repository path {path_or_url!r} does not exist")
        url = str(path)
        name = path.name.removesuffix(".git")
    user = f"local:{local_user()}"
    suffix = hashlib.sha256(url.encode()).hexdigest()[:6]
    return RepoPolicy(
        name=f"{name}-{suffix}",
        url=url,
        base=base or "main",
        invokers=[user],
        approvers=[user],
        reverters=[user],
    )


def find_config_file(settings: Settings) -> Path | None:
    candidates = [settings.config] if settings.config else [Path("conveyor.toml"), settings.home / "conveyor.toml"]
    for candidate in candidates:
        if candidate and candidate.is_file():
            return candidate
    if settings.config:
        raise ConfigError(f"CONVEYOR_CONFIG points at {settings.config}, which is not a file")
    return None


def _line_of(text: str, repo: str | None, key: str | None) -> int | None:
    lines = text.splitlines()
    start = 0
    if repo is not None:
        header = re.compile(rf"^\s*\[repos\.(\"?){re.escape(repo)}\1(\.|\])")
        for i, line in enumerate(lines):
            if header.match(line):
                start = i
                if key is None:
                    return i + 1
                break
    if key is not None:
        pattern = re.compile(rf"^\s*(\"?){re.escape(key)}\1\s*=")
        for i in range(start, len(lines)):
            if pattern.match(lines[i]):
                return i + 1
    return start + 1 if repo is not None else None


def parse_config(text: str, source: Path | None = None) -> ConveyorConfig:
    where = str(source) if source else "conveyor.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    repos: dict[str, RepoPolicy] = {}
    unknown_top = set(data) - {"repos"}
    if unknown_top:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown_top)}; expected [repos.NAME] tables")
    for name, table in (data.get("repos") or {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: repos.{name} must be a table")
        if "name" in table:
            raise ConfigError(f"{where}: repos.{name}.name (line {_line_of(text, name, 'name')}): the name is the table's, remove the key")
        try:
            # strict: TOML has real types, so `approver_must_differ = "yes"` or `max_turns = "5"` is a
            # mistake to report, not a string for pydantic to coerce.
            repos[name] = RepoPolicy.model_validate({**table, "name": name}, strict=True)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = [str(p) for p in err["loc"]]
            key = loc[-1] if loc else None
            line = _line_of(text, name, key if loc and loc[0] != "sandbox" else (loc[1] if len(loc) > 1 else None))
            at = f" (line {line})" if line else ""
            raise ConfigError(f"{where}: repos.{name}.{'.'.join(loc)}{at}: {err['msg']}") from None
        except TypeError as exc:
            raise ConfigError(f"{where}: repos.{name}: {exc}") from None
    return ConveyorConfig(repos=repos, source=source)


def load_config(settings: Settings | None = None) -> ConveyorConfig:
    settings = settings or Settings()
    path = find_config_file(settings)
    if path is None:
        return ConveyorConfig()
    return parse_config(path.read_text(), path)
