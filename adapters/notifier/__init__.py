"""Notifiers: the log/CLI one always; Slack and Linear when configured and the task came from there."""

from __future__ import annotations

from adapters.notifier.base import Notifier
from adapters.notifier.cli import LogNotifier
from conveyor.config import Settings
from conveyor.models import Notice


def notifiers_for(notice: Notice, settings: Settings) -> list[Notifier]:
    chosen: list[Notifier] = [LogNotifier(settings.home)]
    if notice.origin.slack_channel and settings.slack().bot_token:
        from adapters.notifier.slack import SlackNotifier

        chosen.append(SlackNotifier(settings))
    if notice.origin.linear_issue_id and settings.linear().api_key:
        from adapters.notifier.linear import LinearNotifier

        chosen.append(LinearNotifier(settings))
    return chosen
