"""Notifier `cli`: one line per notice in the worker log (and CONVEYOR_HOME/notices.log), which
`conveyor run` and operators read."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from conveyor.models import Notice

log = logging.getLogger("conveyor.notice")


class LogNotifier:
    name = "cli"

    def __init__(self, home: Path):
        self.path = home / "notices.log"

    def notify(self, notice: Notice) -> dict[str, str]:
        line = f"[{notice.task_id}] {notice.stage.value}: {notice.text}"
        log.info(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            record = {"at": datetime.now(timezone.utc).isoformat(), "task": notice.task_id, "kind": notice.kind,
                      "stage": notice.stage.value, "text": notice.text}  # fmt: skip
            fh.write(json.dumps(record) + "\n")
        return {}
