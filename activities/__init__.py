"""Every side effect of the pipeline, one activity per stage step. Workflows call them by name."""

from __future__ import annotations

from collections.abc import Callable

from activities.agent import AgentActivities
from activities.base import Deps
from activities.change import ChangeActivities
from activities.context import ContextActivities
from activities.notify import NotifyActivities
from conveyor.config import Settings


def build_activities(settings: Settings) -> list[Callable]:
    deps = Deps(settings)
    context, agent, change, notify = (
        ContextActivities(deps),
        AgentActivities(deps),
        ChangeActivities(deps),
        NotifyActivities(deps),
    )
    return [
        context.build_context,
        agent.run_agent,
        change.publish_change,
        change.check_change,
        change.merge_change,
        change.close_change,
        change.revert_change,
        notify.notify,
    ]
