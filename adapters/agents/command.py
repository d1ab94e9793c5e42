"""Agent `command`: the task text is a shell command run in the sandbox.

Codemods and deterministic fixes are real uses of the same review-gated pipeline.
"""

from __future__ import annotations

from adapters.agents.base import AgentInvocation, AgentReport, AgentTask
from adapters.sandbox.base import INPUTS_DIR, OUTBOX_DIR, Outcome, SandboxResult

SUMMARY_FILE = "summary.md"
_TAIL_CHARS = 2000


def standard_inputs(task: AgentTask) -> tuple[dict[str, str], dict[str, str]]:
    """The files and env every agent gets: the task, the startup context, where to leave a summary."""
    inputs = {"task.md": task.text, "context.md": task.context_document}
    env = {
        "CONVEYOR_TASK_FILE": f"{INPUTS_DIR}/task.md",
        "CONVEYOR_CONTEXT_FILE": f"{INPUTS_DIR}/context.md",
        "CONVEYOR_SUMMARY_FILE": f"{OUTBOX_DIR}/{SUMMARY_FILE}",
    }
    return inputs, env


class CommandAgent:
    name = "command"

    def invocation(self, task: AgentTask) -> AgentInvocation:
        inputs, env = standard_inputs(task)
        return AgentInvocation(argv=["/bin/sh", "-c", task.text], env=env, inputs=inputs)

    def report(self, result: SandboxResult) -> AgentReport:
        output = result.output.decode("utf-8", errors="replace")
        summary = result.outbox.get(SUMMARY_FILE, "").strip()
        if not summary:
            summary = output[-_TAIL_CHARS:].strip()
        ok = result.outcome == Outcome.ok
        return AgentReport(
            outcome="ok" if ok else "failed",
            summary=summary,
            transcript=output,
            detail="" if ok else f"command exited with {result.exit_code}",
        )
