"""The Notifier protocol: tell humans about a task (CLI log, Slack thread)."""

from __future__ import annotations

from typing import Protocol

from conveyor.models import Notice


class Notifier(Protocol):
    name: str

    def notify(self, notice: Notice) -> dict[str, str]:
        """Deliver one notice and return references to keep (e.g. the Slack progress message ts);
        the workflow passes them back in `notice.refs` next time so messages update in place.
        Must be idempotent: activities retry."""
        ...
