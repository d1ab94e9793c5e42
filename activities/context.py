"""Stage 1: build the startup context the agent gets (AGENTS.md plus dynamic context)."""

from __future__ import annotations

import asyncio

from temporalio import activity

from activities.base import Deps, host_errors
from adapters.context import build_context
from adapters.linear import LinearClient
from conveyor.models import ContextInput, ContextResult


class ContextActivities:
    def __init__(self, deps: Deps):
        self.deps = deps

    @activity.defn(name="build_context")
    @host_errors
    async def build_context(self, inp: ContextInput) -> ContextResult:
        return await asyncio.to_thread(self._build, inp)

    def _build(self, inp: ContextInput) -> ContextResult:
        host = self.deps.codehost(inp.repo)
        base_sha = host.resolve_base(inp.repo, inp.base)
        linear = LinearClient.optional(self.deps.settings)
        document = build_context(host, inp.repo, base_sha, inp.text, inp.origin, linear=linear)
        ref = self.deps.store.put(document.text.encode())
        return ContextResult(
            base_sha=base_sha,
            document=ref,
            warnings=document.warnings,
            cut=document.cut,
            suggested_agents_md=document.suggested_agents_md[:4000],
        )
