"""Per-run cgroup (v1 controllers: memory, pids, cpu) — used where the machine lets us create them.

Each run gets `<controller mount>/conveyor/<run id>`; limits are written before the sandboxed
processes are released, so everything they fork is counted. rlimits apply regardless.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

PARENT = "conveyor"
CONTROLLERS = ("memory", "pids", "cpu")


def _mounts() -> dict[str, Path]:
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        options = set(parts[3].split(","))
        for controller in CONTROLLERS:
            if controller in options and controller not in found:
                found[controller] = Path(parts[1])
    return found


class Cgroup:
    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    @classmethod
    def create(cls, run_id: str | None = None) -> "Cgroup | None":
        """None when cgroups cannot be created here (the caller falls back to rlimits only)."""
        mounts = _mounts()
        if not all(c in mounts for c in CONTROLLERS):
            return None
        run_id = run_id or uuid.uuid4().hex[:12]
        paths: dict[str, Path] = {}
        try:
            for controller in CONTROLLERS:
                path = mounts[controller] / PARENT / run_id
                path.mkdir(parents=True, exist_ok=False)
                paths[controller] = path
        except OSError:
            cls(paths).destroy()
            return None
        return cls(paths)

    def limit(self, memory_bytes: int, pids: int, cpus: float) -> None:
        mem = self.paths["memory"]
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # no swapping past the cap either
            memsw.write_text(str(memory_bytes))
        (self.paths["pids"] / "pids.max").write_text(str(pids))
        cpu = self.paths["cpu"]
        period = 100_000
        (cpu / "cpu.cfs_period_us").write_text(str(period))
        (cpu / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpus * period))))

    def attach(self, pid: int) -> None:
        for path in self.paths.values():
            (path / "cgroup.procs").write_text(str(pid))

    def procs(self) -> list[int]:
        try:
            return [int(p) for p in (self.paths["pids"] / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def oom_kills(self) -> int:
        try:
            for line in (self.paths["memory"] / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def pids_hits(self) -> int:
        try:
            text = (self.paths["pids"] / "pids.events").read_text().split()
            return int(text[1]) if len(text) >= 2 and text[0] == "max" else 0
        except (OSError, ValueError):
            return 0

    def destroy(self) -> None:
        for path in self.paths.values():
            try:
                os.rmdir(path)
            except OSError:
                pass
