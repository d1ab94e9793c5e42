"""The Agent protocol: what to run in the sandbox for a task, and how to read what came out.

An agent never sees credentials: model APIs are reached through a host-side endpoint
(`model_base_url`) that adds the key outside the sandbox.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, Field

from adapters.sandbox.base import SandboxResult


class AgentTask(BaseModel):
    text: str
    context_document: str
    test_command: str = ""
    max_turns: int = 50
    max_cost_usd: float = 5.0
    model_base_url: str = ""


class AgentInvocation(BaseModel):
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)
    """Read-only files at /run/conveyor/<name>."""


class AgentReport(BaseModel):
    outcome: Literal["ok", "failed", "budget"]
    summary: str = ""
    transcript: str = ""
    cost_usd: float | None = None
    turns: int | None = None
    detail: str = ""


class Agent(Protocol):
    name: str

    def invocation(self, task: AgentTask) -> AgentInvocation: ...

    def report(self, result: SandboxResult) -> AgentReport: ...
