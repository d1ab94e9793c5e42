"""Each CLI adapter against a faithful fake of its CLI, run for real as a subprocess."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from adapters.agents import get_agent
from adapters.agents.base import AgentInvocation, AgentTask
from adapters.agents.cli_agents import (
    AGENTS,
    ENDPOINT_PLACEHOLDER_KEY,
    ClaudeCodeAgent,
    CodexAgent,
    OpenCodeAgent,
    json_events,
)
from adapters.sandbox.base import INPUTS_DIR, OUTBOX_DIR, Outcome, SandboxResult

FAKES = Path(__file__).resolve().parents[2] / "fakes"
ENDPOINT = "http://10.0.2.2:8089/anthropic"


def make_task(**overrides) -> AgentTask:
    values = dict(
        text="Add CHANGED_BY_AGENT.txt", context_document="# Startup context\n", test_command="pytest -q",
        max_turns=8, max_cost_usd=1.0, model_base_url=ENDPOINT,
    )
    values.update(overrides)
    return AgentTask(**values)


def run(inv: AgentInvocation, tmp_path: Path, extra_env: dict[str, str] | None = None, timeout: float = 20) -> tuple[SandboxResult, Path]:
    """Run an invocation the way the sandbox would, minus isolation: inputs as files, a
    writable outbox, the invocation's env only (plus PATH), cwd = workspace."""
    workspace = tmp_path / "workspace"
    run_dir = tmp_path / "run"
    outbox = run_dir / "out"
    for d in (workspace, outbox):
        d.mkdir(parents=True, exist_ok=True)
    for name, content in inv.inputs.items():
        (run_dir / name).write_text(content)
    remap = lambda v: v.replace(OUTBOX_DIR, str(outbox)).replace(INPUTS_DIR, str(run_dir))  # noqa: E731
    env = {k: remap(v) for k, v in inv.env.items()}
    env["HOME"] = str(tmp_path / "home")
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env.update(extra_env or {})
    argv = [remap(a) for a in inv.argv]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
        outcome = Outcome.ok if proc.returncode == 0 else Outcome.exit_nonzero
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        outcome = Outcome.timeout
    outbox_files = {p.name: p.read_text() for p in outbox.iterdir() if p.is_file()}
    result = SandboxResult(
        outcome=outcome, exit_code=proc.returncode, output=out, duration_s=time.monotonic() - started, outbox=outbox_files
    )
    return result, workspace


@pytest.mark.parametrize("cls", [ClaudeCodeAgent, OpenCodeAgent, CodexAgent])
def test_registered_and_no_key_in_invocation(cls):
    assert AGENTS[cls.name] is cls
    assert isinstance(get_agent(cls.name), cls)
    inv = cls().invocation(make_task())
    assert inv.inputs == {"task.md": "Add CHANGED_BY_AGENT.txt", "context.md": "# Startup context\n"}
    flat = " ".join(inv.argv) + " " + " ".join(f"{k}={v}" for k, v in inv.env.items())
    assert ENDPOINT in flat, "the model endpoint is set through the CLI's base-URL setting"
    assert "sk-" not in flat
    prompt = inv.argv[2] if cls is ClaudeCodeAgent else inv.argv[-1]
    assert prompt.endswith("Task:\nAdd CHANGED_BY_AGENT.txt")
    assert "/run/conveyor/out/summary.md" in prompt and "Check your change with: pytest -q" in prompt


@pytest.mark.parametrize("cls", [ClaudeCodeAgent, OpenCodeAgent, CodexAgent])
def test_missing_endpoint_is_refused(cls):
    with pytest.raises(ValueError, match="model_base_url"):
        cls().invocation(make_task(model_base_url=""))


def test_claude_code_success(tmp_path: Path):
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    inv = agent.invocation(make_task())
    assert inv.env["ANTHROPIC_BASE_URL"] == ENDPOINT
    assert inv.env["ANTHROPIC_API_KEY"] == ENDPOINT_PLACEHOLDER_KEY
    result, workspace = run(inv, tmp_path)
    assert result.outcome == Outcome.ok, result.output.decode()
    assert (workspace / "CHANGED_BY_AGENT.txt").read_text() == "fixed by fake claude\n"
    report = agent.report(result)
    assert report.outcome == "ok", report.detail
    assert report.turns == 4
    assert report.cost_usd == pytest.approx(0.04)
    assert report.usage["output_tokens"] == 160 and report.usage["cache_read_input_tokens"] == 3600
    assert report.summary.startswith("## What changed\nAdded CHANGED_BY_AGENT.txt")
    assert "[tool_use Write]" in report.transcript and "[tool_result] File created successfully" in report.transcript
    assert "fake claude: starting (this line is stderr)" in report.transcript
    assert "cost_usd: 0.0400" in report.transcript
    init = next(json_events(result.output))
    assert init["permissionMode"] == "acceptEdits" and "WebFetch" not in init["tools"]


def test_claude_code_summary_falls_back_to_final_message(tmp_path: Path):
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    result, _ = run(agent.invocation(make_task()), tmp_path, {"FAKE_AGENT_SCENARIO": "no_summary"})
    report = agent.report(result)
    assert report.outcome == "ok"
    assert report.summary == "Done: added CHANGED_BY_AGENT.txt because the task asked for it."


def test_claude_code_max_turns_is_budget(tmp_path: Path):
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    result, _ = run(agent.invocation(make_task(max_turns=5)), tmp_path, {"FAKE_AGENT_SCENARIO": "loop"})
    assert result.outcome == Outcome.exit_nonzero
    report = agent.report(result)
    assert report.outcome == "budget"
    assert report.turns == 5 and "turn budget exceeded" in report.detail


def test_claude_code_cost_limit_is_budget(tmp_path: Path):
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    inv = agent.invocation(make_task(max_turns=100, max_cost_usd=0.5))
    result, _ = run(inv, tmp_path, {"FAKE_AGENT_SCENARIO": "loop", "FAKE_COST_PER_TURN": "0.2"})
    report = agent.report(result)
    assert report.outcome == "budget" and "cost budget exceeded" in report.detail
    assert report.cost_usd == pytest.approx(0.6)


def test_claude_code_over_budget_seen_after_the_fact(tmp_path: Path):
    # The CLI finished, but spent more than the policy allows (e.g. an older CLI without
    # --max-budget-usd): still the distinct budget outcome.
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    task = make_task(max_cost_usd=0.5)
    inv = agent.invocation(task)
    i = inv.argv.index("--max-budget-usd")
    inv.argv[i + 1] = "100"
    result, _ = run(inv, tmp_path, {"FAKE_COST_PER_TURN": "0.2"})
    assert result.outcome == Outcome.ok
    report = agent.report(result, task)
    assert report.outcome == "budget" and "$0.80, limit $0.50" in report.detail


def test_claude_code_failures(tmp_path: Path):
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    result, _ = run(agent.invocation(make_task()), tmp_path / "a", {"FAKE_AGENT_SCENARIO": "error"})
    report = agent.report(result)
    assert report.outcome == "failed" and "error_during_execution" in report.detail
    assert "API Error: 500" in report.transcript
    result, _ = run(agent.invocation(make_task()), tmp_path / "b", {"FAKE_AGENT_SCENARIO": "garbage"})
    report = agent.report(result)
    assert report.outcome == "failed" and "no result message" in report.detail
    assert "Segmentation fault" in report.summary


def test_claude_code_time_limit(tmp_path: Path):
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    inv = agent.invocation(make_task(max_turns=10_000, max_cost_usd=1000))
    result, _ = run(inv, tmp_path, {"FAKE_AGENT_SCENARIO": "loop", "FAKE_TURN_DELAY": "0.05"}, timeout=1.0)
    assert result.outcome == Outcome.timeout
    report = agent.report(result)
    assert report.outcome == "failed" and report.detail.startswith("time limit reached")
    assert "[tool_use Bash]" in report.transcript


def test_claude_code_needs_verbose_for_stream_json(tmp_path: Path):
    # The fake is faithful: without --verbose the real CLI refuses stream-json in print mode.
    agent = ClaudeCodeAgent(executable=str(FAKES / "claude"))
    inv = agent.invocation(make_task())
    inv.argv.remove("--verbose")
    result, _ = run(inv, tmp_path)
    assert result.exit_code == 1 and b"requires --verbose" in result.output


def test_opencode_success(tmp_path: Path):
    agent = OpenCodeAgent(executable=str(FAKES / "opencode"))
    inv = agent.invocation(make_task())
    assert '"steps": 8' in inv.env["OPENCODE_CONFIG_CONTENT"]
    result, workspace = run(inv, tmp_path)
    assert result.outcome == Outcome.ok, result.output.decode()
    assert (workspace / "CHANGED_BY_AGENT.txt").exists()
    report = agent.report(result)
    assert report.outcome == "ok", report.detail
    assert report.turns == 3 and report.cost_usd == pytest.approx(0.03)
    assert report.usage["input_tokens"] == 300 and report.usage["cache_read_tokens"] == 2400
    assert report.summary.startswith("## What changed")
    assert "[tool_use write completed]" in report.transcript


def test_opencode_step_limit_is_budget(tmp_path: Path):
    agent = OpenCodeAgent(executable=str(FAKES / "opencode"))
    result, _ = run(agent.invocation(make_task(max_turns=6)), tmp_path, {"FAKE_AGENT_SCENARIO": "loop"})
    report = agent.report(result)
    assert result.outcome == Outcome.ok  # opencode itself exits 0 at its step limit
    assert report.outcome == "budget" and report.turns == 6


def test_opencode_cost_over_budget(tmp_path: Path):
    agent = OpenCodeAgent(executable=str(FAKES / "opencode"))
    result, _ = run(agent.invocation(make_task(max_cost_usd=0.25)), tmp_path, {"FAKE_COST_PER_TURN": "0.1"})
    report = agent.report(result)
    assert report.outcome == "budget" and "cost budget exceeded" in report.detail


def test_opencode_error(tmp_path: Path):
    agent = OpenCodeAgent(executable=str(FAKES / "opencode"))
    result, _ = run(agent.invocation(make_task()), tmp_path, {"FAKE_AGENT_SCENARIO": "error"})
    report = agent.report(result)
    assert report.outcome == "failed" and "model endpoint returned 500" in report.detail


def test_codex_success(tmp_path: Path):
    agent = CodexAgent(executable=str(FAKES / "codex"))
    inv = agent.invocation(make_task())
    assert "--json" in inv.argv and 'model_provider="conveyor"' in inv.argv
    result, workspace = run(inv, tmp_path)
    assert result.outcome == Outcome.ok, result.output.decode()
    assert (workspace / "CHANGED_BY_AGENT.txt").read_text() == "fixed by fake codex\n"
    assert result.outbox["last-message.md"] == "Added CHANGED_BY_AGENT.txt as requested.\n"
    report = agent.report(result)
    assert report.outcome == "ok", report.detail
    assert report.usage == {"input_tokens": 24000, "cached_input_tokens": 20000, "output_tokens": 1500}
    assert report.cost_estimated and report.cost_usd == pytest.approx(0.0225)
    assert report.turns == 3  # two tool actions + the final answer
    assert "[command exit=0]" in report.transcript and "[file_change completed] add" in report.transcript


def test_codex_summary_from_last_message(tmp_path: Path):
    agent = CodexAgent(executable=str(FAKES / "codex"))
    result, _ = run(agent.invocation(make_task()), tmp_path, {"FAKE_AGENT_SCENARIO": "no_summary"})
    assert agent.report(result).summary == "Added CHANGED_BY_AGENT.txt as requested."


def test_codex_turn_budget(tmp_path: Path):
    agent = CodexAgent(executable=str(FAKES / "codex"))
    result, _ = run(agent.invocation(make_task(max_turns=20)), tmp_path, {"FAKE_AGENT_SCENARIO": "loop"})
    report = agent.report(result)
    assert report.outcome == "budget" and report.turns == 63


def test_codex_error(tmp_path: Path):
    agent = CodexAgent(executable=str(FAKES / "codex"))
    result, _ = run(agent.invocation(make_task()), tmp_path, {"FAKE_AGENT_SCENARIO": "error"})
    report = agent.report(result)
    assert report.outcome == "failed" and "500 Internal Server Error" in report.detail


def test_codex_provider_config_is_required(tmp_path: Path):
    agent = CodexAgent(executable=str(FAKES / "codex"))
    inv = agent.invocation(make_task())
    inv.argv[inv.argv.index('model_provider="conveyor"')] = 'model_provider="missing"'
    result, _ = run(inv, tmp_path)
    report = agent.report(result)
    assert result.exit_code == 1 and report.outcome == "failed"
    assert "has no base_url" in report.summary


def test_worker_side_executable_and_model_overrides(monkeypatch):
    monkeypatch.setenv("CONVEYOR_CLAUDE_BIN", "/opt/claude/bin/claude")
    monkeypatch.setenv("CONVEYOR_CLAUDE_MODEL", "claude-sonnet-4-5")
    inv = get_agent("claude-code").invocation(make_task())
    assert inv.argv[0] == "/opt/claude/bin/claude"
    assert inv.argv[inv.argv.index("--model") + 1] == "claude-sonnet-4-5"
    monkeypatch.setenv("CONVEYOR_CODEX_BIN", str(FAKES / "codex"))
    assert get_agent("codex").invocation(make_task()).argv[0] == str(FAKES / "codex")
    assert get_agent("opencode").invocation(make_task()).argv[0] == "opencode"
