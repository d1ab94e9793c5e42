"""`conveyor up` as a real process: dev server + UI + worker; a task runs against it; Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import git
from tests.workflows.test_durability import free_port
from temporal.devserver import port_open

ROOT = Path(__file__).resolve().parents[2]


def test_up_serves_tasks_and_stops_cleanly_on_ctrl_c(tmp_path, bare_repo):
    port, ui_port = free_port(), free_port()
    env = {**os.environ, "CONVEYOR_HOME": str(tmp_path / "home"), "CONVEYOR_TEMPORAL_PORT": str(port),
           "CONVEYOR_UI_PORT": str(ui_port), "PYTHONPATH": str(ROOT)}  # fmt: skip
    for var in ("SLACK_BOT_TOKEN", "CONVEYOR_TEMPORAL_ADDRESS", "TEMPORAL_ADDRESS", "CONVEYOR_CONFIG"):
        env.pop(var, None)
    up = subprocess.Popen([sys.executable, "-m", "triggers.cli", "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        lines = []
        assert up.stdout is not None
        while not any("worker running" in line for line in lines):
            line = up.stdout.readline()
            assert line, f"conveyor up exited early: {''.join(lines)}"
            lines.append(line)
        assert any(f"127.0.0.1:{ui_port}" in line for line in lines)
        assert port_open("127.0.0.1", ui_port), "the Web UI is not serving"
        run = subprocess.run(
            [sys.executable, "-m", "triggers.cli", "run", "--repo", str(bare_repo), "--approve", "--json",
             "echo from-up >> README.md"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        status = json.loads(run.stdout)
        assert status["stage"] == "merged" and status["merge_sha"] == git(bare_repo, "rev-parse", "main")
        assert (tmp_path / "home" / "temporal.db").exists()
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=20)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert code == 0
    deadline = time.monotonic() + 5
    while port_open("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not port_open("127.0.0.1", port), "the dev server outlived `conveyor up`"
