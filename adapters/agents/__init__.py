"""Agent adapters, chosen per repo (policy) or per task by name."""

from __future__ import annotations

from adapters.agents.base import Agent
from adapters.agents.command import CommandAgent


class UnknownAgent(ValueError):
    pass


def get_agent(name: str) -> Agent:
    agents: dict[str, type] = {"command": CommandAgent}
    try:
        from adapters.agents import cli_agents  # Claude Code / OpenCode / Codex adapters

        agents.update(cli_agents.AGENTS)
    except ImportError:
        pass
    try:
        return agents[name]()
    except KeyError:
        raise UnknownAgent(f"unknown agent {name!r} (known: {', '.join(sorted(agents))})") from None
