"""Real coding-agent CLIs run headless in the sandbox: Claude Code, OpenCode, Codex.

Each adapter builds the argv/env for one CLI and parses that CLI's documented machine output
(stream-json / JSONL events) into a readable transcript, turns, token usage and cost. Model
APIs are reached only through `task.model_base_url`, the sandbox's credential-adding endpoint,
set via each CLI's own base-URL setting: no key ever enters argv or env. Budget excess (turns or
cost, whether the CLI stopped itself or we see it afterwards) is outcome "budget", distinct from
failure; the time limit is the sandbox's wall clock (a timed-out run reports "failed" with the
reason, and the sandbox outcome `timeout` stays visible to the activity).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field

from adapters.agents.base import AgentInvocation, AgentReport, AgentTask
from adapters.agents.command import SUMMARY_FILE, standard_inputs
from adapters.sandbox.base import INPUTS_DIR, OUTBOX_DIR, Outcome, SandboxResult

AGENT_HOME = "/tmp/agent-home"
"""Writable HOME for CLI state inside the sandbox (only /workspace and /tmp are writable)."""
ENDPOINT_PLACEHOLDER_KEY = "conveyor-endpoint-adds-the-key"
"""Not a credential: some CLIs refuse to start without *a* key. The host-side endpoint drops
whatever key the request carries and adds the real one."""
LAST_MESSAGE_FILE = "last-message.md"
_TEXT_CAP = 4000
_SUMMARY_CAP = 8000


class CLIAgentReport(AgentReport):
    """AgentReport plus what the CLI told us about its run."""

    usage: dict[str, int] = Field(default_factory=dict)
    cost_estimated: bool = False
    session_id: str = ""


def build_prompt(task: AgentTask) -> str:
    """The one prompt every CLI agent gets: where its inputs are and what to leave behind."""
    lines = [
        "You are a coding agent working in the repository checked out in your current directory (/workspace).",
        f"Startup context (repository instructions, recent commits, CI status and the conversation that asked for "
        f"this) is in {INPUTS_DIR}/context.md: read it first. The task is also in {INPUTS_DIR}/task.md.",
        "Change files in the working tree only. Do not commit, push or create branches: your changes are taken "
        "from the working tree as a patch and reviewed by a human before anything merges.",
    ]
    if task.test_command:
        lines.append(f"Check your change with: {task.test_command}")
    lines += [
        f"When you are done, write a short summary for the reviewer to {OUTBOX_DIR}/{SUMMARY_FILE} with the "
        "sections: ## What changed, ## Why, ## How it was verified, ## Risks and follow-ups. Keep it under 300 words.",
        "",
        "Task:",
        task.text.strip(),
    ]
    return "\n".join(lines)


def json_events(output: bytes) -> Iterator[dict[str, Any]]:
    """JSON objects, one per line, from interleaved stdout+stderr; other lines are skipped."""
    for raw in output.decode("utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def _clip(text: str, cap: int = _TEXT_CAP) -> str:
    text = text.rstrip()
    return text if len(text) <= cap else text[:cap] + f"\n[... {len(text) - cap} more characters]"


def _non_json_lines(output: bytes, limit: int = 40) -> list[str]:
    lines = [ln for ln in output.decode("utf-8", errors="replace").splitlines() if ln.strip() and not ln.strip().startswith("{")]
    return lines[-limit:]


def _fmt_usage(usage: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(usage.items()))


class _CLIAgent:
    name: ClassVar[str]
    executable: ClassVar[str]
    env_prefix: ClassVar[str]
    """Worker-side (trusted) overrides: CONVEYOR_<PREFIX>_BIN (path of the CLI inside the
    sandbox image) and CONVEYOR_<PREFIX>_MODEL."""

    def __init__(self, executable: str | None = None, model: str | None = None, extra_args: list[str] | None = None):
        self.executable_path = executable or os.environ.get(f"CONVEYOR_{self.env_prefix}_BIN") or self.executable
        self.model = model if model is not None else os.environ.get(f"CONVEYOR_{self.env_prefix}_MODEL", "")
        self.extra_args = list(extra_args or [])

    def _base_env(self, task: AgentTask) -> tuple[dict[str, str], dict[str, str]]:
        if not task.model_base_url:
            raise ValueError(
                f"agent {self.name!r} needs task.model_base_url (the sandbox's credential-adding model endpoint)"
            )
        inputs, env = standard_inputs(task)
        env["HOME"] = AGENT_HOME
        return inputs, env

    def _finish(
        self,
        result: SandboxResult,
        *,
        ok: bool,
        budget_reason: str,
        failure: str,
        final_text: str,
        transcript: list[str],
        cost: float | None,
        turns: int | None,
        usage: dict[str, int],
        cost_estimated: bool = False,
        session_id: str = "",
    ) -> CLIAgentReport:
        summary = result.outbox.get(SUMMARY_FILE, "").strip() or final_text.strip()
        if not summary:
            summary = "\n".join(_non_json_lines(result.output, 20))
        extra = _non_json_lines(result.output)
        if extra:
            transcript = transcript + ["", "--- other output (stderr) ---", *extra]
        footer = [
            "",
            "--- run ---",
            f"turns: {turns if turns is not None else 'unknown'}",
            f"cost_usd: {cost:.4f}{' (estimated from tokens)' if cost_estimated else ''}" if cost is not None else "cost_usd: unknown",
            f"usage: {_fmt_usage(usage) or 'unknown'}",
            f"sandbox: {result.outcome.value} exit={result.exit_code} in {result.duration_s:.1f}s",
        ]
        if result.output_truncated:
            footer.append("output truncated at the sandbox's cap")
        if budget_reason:
            outcome, detail = "budget", budget_reason
        elif result.outcome == Outcome.timeout:
            outcome, detail = "failed", f"time limit reached after {result.duration_s:.0f}s"
        elif ok and result.outcome == Outcome.ok:
            outcome, detail = "ok", ""
        else:
            outcome = "failed"
            detail = failure or result.detail or f"{self.name} exited with {result.exit_code} ({result.outcome.value})"
        return CLIAgentReport(
            outcome=outcome,
            summary=_clip(summary, _SUMMARY_CAP),
            transcript="\n".join(transcript + footer) + "\n",
            cost_usd=cost,
            turns=turns,
            detail=detail,
            usage=usage,
            cost_estimated=cost_estimated,
            session_id=session_id,
        )

    @staticmethod
    def _over_budget(task_turns: int | None, task_cost: float | None, max_turns: int, max_cost: float) -> str:
        if task_turns is not None and task_turns > max_turns:
            return f"turn budget exceeded: {task_turns} turns, limit {max_turns}"
        if task_cost is not None and task_cost > max_cost:
            return f"cost budget exceeded: ${task_cost:.2f}, limit ${max_cost:.2f}"
        return ""


class ClaudeCodeAgent(_CLIAgent):
    """`claude -p` headless with `--output-format stream-json --verbose`."""

    name = "claude-code"
    executable = "claude"
    env_prefix = "CLAUDE"
    allowed_tools = ("Bash", "Read", "Edit", "MultiEdit", "Write", "Glob", "Grep", "LS", "TodoWrite")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._limits: tuple[int, float] | None = None

    def invocation(self, task: AgentTask) -> AgentInvocation:
        inputs, env = self._base_env(task)
        env.update(
            {
                "ANTHROPIC_BASE_URL": task.model_base_url,
                "ANTHROPIC_API_KEY": ENDPOINT_PLACEHOLDER_KEY,
                # no egress besides the model endpoint: skip updaters, telemetry, error reporting
                "DISABLE_AUTOUPDATER": "1",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "DISABLE_TELEMETRY": "1",
                "DISABLE_ERROR_REPORTING": "1",
            }
        )
        argv = [self.executable_path, "-p", build_prompt(task)]
        argv += ["--output-format", "stream-json", "--verbose"]
        argv += ["--max-turns", str(task.max_turns), "--max-budget-usd", f"{task.max_cost_usd:.2f}"]
        argv += ["--permission-mode", "acceptEdits"]
        if self.model:
            argv += ["--model", self.model]
        argv += [*self.extra_args, "--allowedTools", ",".join(self.allowed_tools)]
        self._limits = (task.max_turns, task.max_cost_usd)
        return AgentInvocation(argv=argv, env=env, inputs=inputs)

    def report(self, result: SandboxResult, task: AgentTask | None = None) -> CLIAgentReport:
        max_turns, max_cost = (task.max_turns, task.max_cost_usd) if task else (self._limits or (10**9, float("inf")))
        transcript: list[str] = []
        final: dict[str, Any] | None = None
        session = ""
        for ev in json_events(result.output):
            kind = ev.get("type")
            if kind == "system" and ev.get("subtype") == "init":
                session = ev.get("session_id", "")
                transcript.append(f"[init] model={ev.get('model', '?')} tools={','.join(ev.get('tools', []))}")
            elif kind in ("assistant", "user"):
                for block in (ev.get("message") or {}).get("content") or []:
                    transcript.append(_claude_block(kind, block))
            elif kind == "result":
                final = ev
        if final is None:
            return self._finish(
                result, ok=False, budget_reason="", transcript=transcript, cost=None, turns=None, usage={},
                final_text="", session_id=session,
                failure="claude produced no result message" + (" (output truncated)" if result.output_truncated else ""),
            )
        usage = {k: int(v) for k, v in (final.get("usage") or {}).items() if isinstance(v, (int, float))}
        cost = final.get("total_cost_usd")
        turns = final.get("num_turns")
        subtype = final.get("subtype", "")
        budget = ""
        if subtype == "error_max_turns":
            budget = f"turn budget exceeded: stopped at {turns} turns (limit {max_turns})"
        elif subtype == "error_max_budget_usd":
            budget = f"cost budget exceeded: ${cost or 0:.2f} (limit ${max_cost:.2f})"
        else:
            budget = self._over_budget(turns, cost, max_turns, max_cost)
        ok = subtype == "success" and not final.get("is_error", False)
        failure = "" if ok else f"claude result {subtype or 'unknown'}: {_clip(str(final.get('result') or final.get('errors') or ''), 500)}"
        transcript.append(f"[result] {subtype} {_clip(str(final.get('result', '')))}")
        return self._finish(
            result, ok=ok, budget_reason=budget, failure=failure, final_text=str(final.get("result") or ""),
            transcript=transcript, cost=float(cost) if cost is not None else None,
            turns=int(turns) if turns is not None else None, usage=usage, session_id=final.get("session_id", session),
        )


def _claude_block(role: str, block: dict[str, Any]) -> str:
    kind = block.get("type")
    if kind == "text":
        return f"[{role}] {_clip(block.get('text', ''))}"
    if kind == "thinking":
        return f"[{role} thinking] {_clip(block.get('thinking', ''), 1000)}"
    if kind == "tool_use":
        return f"[tool_use {block.get('name', '?')}] {_clip(json.dumps(block.get('input', {}), sort_keys=True), 1000)}"
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            content = "\n".join(c.get("text", "") for c in content if isinstance(c, dict))
        flag = " (error)" if block.get("is_error") else ""
        return f"[tool_result{flag}] {_clip(str(content or ''), 1500)}"
    return f"[{role} {kind}]"


class OpenCodeAgent(_CLIAgent):
    """`opencode run --format json`: JSONL events step_start / text / tool_use / step_finish / error."""

    name = "opencode"
    executable = "opencode"
    env_prefix = "OPENCODE"
    default_model = "anthropic/claude-sonnet-4-5"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._limits: tuple[int, float] | None = None

    def config(self, task: AgentTask) -> dict[str, Any]:
        provider = (self.model or self.default_model).split("/", 1)[0]
        return {
            "$schema": "https://opencode.ai/config.json",
            "model": self.model or self.default_model,
            "provider": {provider: {"options": {"baseURL": task.model_base_url, "apiKey": ENDPOINT_PLACEHOLDER_KEY}}},
            # The build agent's step limit is OpenCode's turn budget.
            "agent": {"build": {"steps": task.max_turns}},
            "permission": {"edit": "allow", "bash": "allow", "webfetch": "deny"},
            "autoupdate": False,
            "share": "disabled",
        }

    def invocation(self, task: AgentTask) -> AgentInvocation:
        inputs, env = self._base_env(task)
        env["OPENCODE_CONFIG_CONTENT"] = json.dumps(self.config(task), sort_keys=True)
        env["OPENCODE_DISABLE_AUTOUPDATE"] = "1"
        argv = [self.executable_path, "run", "--format", "json", "--model", self.model or self.default_model]
        argv += [*self.extra_args, build_prompt(task)]
        self._limits = (task.max_turns, task.max_cost_usd)
        return AgentInvocation(argv=argv, env=env, inputs=inputs)

    def report(self, result: SandboxResult, task: AgentTask | None = None) -> CLIAgentReport:
        max_turns, max_cost = (task.max_turns, task.max_cost_usd) if task else (self._limits or (10**9, float("inf")))
        transcript: list[str] = []
        steps = 0
        cost = 0.0
        usage: dict[str, int] = {}
        texts: list[str] = []
        last_reason = ""
        errors: list[str] = []
        session = ""
        for ev in json_events(result.output):
            kind = ev.get("type")
            part = ev.get("part") or {}
            session = session or ev.get("sessionID", "")
            if kind == "text":
                texts.append(part.get("text", ""))
                transcript.append(f"[assistant] {_clip(part.get('text', ''))}")
            elif kind == "tool_use":
                state = part.get("state") or {}
                transcript.append(
                    f"[tool_use {part.get('tool', '?')} {state.get('status', '')}] "
                    f"{_clip(json.dumps(state.get('input', {}), sort_keys=True), 1000)}"
                )
                if state.get("output"):
                    transcript.append(f"[tool_result] {_clip(str(state.get('output')), 1500)}")
            elif kind == "step_finish":
                steps += 1
                cost += float(part.get("cost") or 0)
                last_reason = part.get("reason", "")
                tokens = part.get("tokens") or {}
                for key in ("input", "output", "reasoning"):
                    usage[f"{key}_tokens"] = usage.get(f"{key}_tokens", 0) + int(tokens.get(key) or 0)
                cache = tokens.get("cache") or {}
                for key in ("read", "write"):
                    usage[f"cache_{key}_tokens"] = usage.get(f"cache_{key}_tokens", 0) + int(cache.get(key) or 0)
            elif kind == "error":
                err = ev.get("error") or {}
                message = (err.get("data") or {}).get("message") or err.get("message") or ev.get("message") or err.get("name") or "error"
                errors.append(str(message))
                transcript.append(f"[error] {message}")
        budget = self._over_budget(steps, cost, max_turns, max_cost)
        if not budget and steps >= max_turns:
            # At its step limit OpenCode makes the model stop and answer in text, then exits 0.
            budget = f"turn budget exhausted: {steps} steps, limit {max_turns}"
        ok = not errors and (last_reason == "stop" or (steps > 0 and result.exit_code == 0))
        failure = "; ".join(errors) if errors else ("" if steps else "opencode produced no step events")
        return self._finish(
            result, ok=ok, budget_reason=budget, failure=failure, final_text=texts[-1] if texts else "",
            transcript=transcript, cost=cost if steps else None, turns=steps if steps else None, usage=usage,
            session_id=session,
        )


class CodexAgent(_CLIAgent):
    """`codex exec --json`: JSONL thread.started / turn.* / item.* / error events."""

    name = "codex"
    executable = "codex"
    env_prefix = "CODEX"
    # Codex reports tokens, not dollars: cost is estimated with these prices (USD per 1M tokens).
    price_input = 1.25
    price_cached_input = 0.125
    price_output = 10.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._limits: tuple[int, float] | None = None

    def invocation(self, task: AgentTask) -> AgentInvocation:
        inputs, env = self._base_env(task)
        env["CODEX_HOME"] = f"{AGENT_HOME}/.codex"
        # A model provider without env_key sends no Authorization header: the endpoint adds it.
        provider = [
            "-c", f"model_providers.conveyor.name={json.dumps('Conveyor model endpoint')}",
            "-c", f"model_providers.conveyor.base_url={json.dumps(task.model_base_url)}",
            "-c", 'model_providers.conveyor.wire_api="responses"',
            "-c", 'model_provider="conveyor"',
        ]
        argv = [self.executable_path, "exec", "--json", *provider]
        if self.model:
            argv += ["--model", self.model]
        # The Conveyor sandbox is the isolation; Codex's own nested sandbox cannot start inside it.
        argv += ["--dangerously-bypass-approvals-and-sandbox", "--skip-git-repo-check"]
        argv += ["--output-last-message", f"{OUTBOX_DIR}/{LAST_MESSAGE_FILE}"]
        argv += [*self.extra_args, build_prompt(task)]
        self._limits = (task.max_turns, task.max_cost_usd)
        return AgentInvocation(argv=argv, env=env, inputs=inputs)

    def report(self, result: SandboxResult, task: AgentTask | None = None) -> CLIAgentReport:
        max_turns, max_cost = (task.max_turns, task.max_cost_usd) if task else (self._limits or (10**9, float("inf")))
        transcript: list[str] = []
        usage = {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0}
        turns_completed = 0
        actions = 0
        messages: list[str] = []
        errors: list[str] = []
        thread = ""
        seen_usage = False
        for ev in json_events(result.output):
            kind = ev.get("type", "")
            if kind == "thread.started":
                thread = ev.get("thread_id", "")
            elif kind == "turn.completed":
                turns_completed += 1
                seen_usage = True
                for key in usage:
                    usage[key] += int((ev.get("usage") or {}).get(key) or 0)
            elif kind == "turn.failed":
                errors.append(str((ev.get("error") or {}).get("message", "turn failed")))
            elif kind == "error":
                errors.append(str(ev.get("message", "error")))
            elif kind == "item.completed":
                item = ev.get("item") or {}
                itype = item.get("type") or item.get("item_type")
                if itype == "agent_message":
                    messages.append(item.get("text", ""))
                    transcript.append(f"[assistant] {_clip(item.get('text', ''))}")
                elif itype == "reasoning":
                    transcript.append(f"[reasoning] {_clip(item.get('text', ''), 1000)}")
                elif itype == "command_execution":
                    actions += 1
                    transcript.append(f"[command exit={item.get('exit_code')}] {item.get('command', '')}")
                    if item.get("aggregated_output"):
                        transcript.append(f"[output] {_clip(item['aggregated_output'], 1500)}")
                elif itype == "file_change":
                    actions += 1
                    changes = ", ".join(f"{c.get('kind', '?')} {c.get('path', '?')}" for c in item.get("changes") or [])
                    transcript.append(f"[file_change {item.get('status', '')}] {changes}")
                elif itype in ("mcp_tool_call", "web_search"):
                    actions += 1
                    transcript.append(f"[{itype}] {_clip(json.dumps(item, sort_keys=True), 500)}")
                elif itype == "error":
                    transcript.append(f"[error item] {item.get('message', '')}")
        for err in errors:
            transcript.append(f"[error] {err}")
        cost = None
        if seen_usage:
            fresh = max(usage["input_tokens"] - usage["cached_input_tokens"], 0)
            cost = (
                fresh * self.price_input + usage["cached_input_tokens"] * self.price_cached_input
                + usage["output_tokens"] * self.price_output
            ) / 1_000_000
        # One model round trip per tool action plus the final answer.
        turns = actions + 1 if (seen_usage or messages or actions) else None
        budget = self._over_budget(turns, cost, max_turns, max_cost)
        ok = not errors and turns_completed > 0
        failure = "; ".join(errors) if errors else ("" if turns_completed else "codex reported no completed turn")
        final_text = result.outbox.get(LAST_MESSAGE_FILE, "") or (messages[-1] if messages else "")
        return self._finish(
            result, ok=ok, budget_reason=budget, failure=failure, final_text=final_text, transcript=transcript,
            cost=cost, turns=turns, usage=usage if seen_usage else {}, cost_estimated=cost is not None, session_id=thread,
        )


AGENTS: dict[str, type] = {
    ClaudeCodeAgent.name: ClaudeCodeAgent,
    "claude": ClaudeCodeAgent,
    OpenCodeAgent.name: OpenCodeAgent,
    CodexAgent.name: CodexAgent,
}


def describe(argv: list[str]) -> str:
    """Shell-quoted argv for logs (prompts are long: clipped)."""
    return " ".join(shlex.quote(a if len(a) < 80 else a[:77] + "...") for a in argv)
