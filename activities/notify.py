"""Tell humans: every notifier that applies to the notice (log always, Slack/Linear by origin)."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.base import Deps
from adapters.notifier import notifiers_for
from conveyor.models import Notice


class NotifyActivities:
    def __init__(self, deps: Deps):
        self.deps = deps

    @activity.defn(name="notify")
    async def notify(self, notice: Notice) -> dict[str, str]:
        if not notice.ui_url:
            notice.ui_url = self.deps.settings.task_ui_url(notice.task_id)
        refs: dict[str, str] = {}
        for notifier in notifiers_for(notice, self.deps.settings):
            update = notice.model_copy(update={"refs": {**notice.refs, **refs}})
            try:
                refs.update(await asyncio.to_thread(notifier.notify, update))
            except Exception as exc:
                # Notifier errors say whether retrying can help (a bot removed from a channel cannot).
                if getattr(exc, "retryable", True) is False:
                    raise ApplicationError(f"{notifier.name}: {exc}", type="NotifyError", non_retryable=True) from None
                raise
        return refs
