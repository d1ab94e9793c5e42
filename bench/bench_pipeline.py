"""Whole-pipeline latency on one embedded stack, like production: the embedded Temporal dev server
(SQLite file under a temporary CONVEYOR_HOME, free ports), the real worker in this process,
the real bubblewrap sandbox and the local git code host on a bare repository.

Measured per task (sequentially, so one task's figures are not another's queueing):
  1. trigger -> agent command started: wall clock just before start_task() to the timestamp the
     agent's command writes (`date +%s.%N`, the first thing its shell runs inside the sandbox).
  2. orchestration overhead: start_task() -> `merged` (audit trail time) minus the agent
     command's own run time, divided by the number of stage transitions. The verdict counts the
     bench's own review reaction (awaiting_review -> approve sent: a poll and a status query) as
     overhead, which is conservative; the figure without it is printed too.
  3. revert: revert_task() -> the bare repository's base ref pointing at a commit carrying
     `Conveyor-Reverts: <task>` (the ref file is polled every 2 ms).
Baselines in the same process: a bare subprocess and a bare `bwrap --unshare-all --cap-drop ALL`.
A measurement, not a test: it always exits 0 once the stack ran.

    python bench/bench_pipeline.py [--tasks N]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor import search  # noqa: E402
from conveyor.config import RepoPolicy, Settings  # noqa: E402
from conveyor.models import Decision, Identity, Origin, Stage, TaskStatus  # noqa: E402
from temporal.demo import FILES, make_repo  # noqa: E402
from temporal.devserver import DevServer  # noqa: E402
from triggers import service  # noqa: E402

GOAL_TRANSITION_MS = 250.0
GOAL_REVERT_S = 3.0
POLL_S = 0.02  # stage polling by the bench: decides when to approve/revert; never part of a figure
REF_POLL_S = 0.002
BASELINE_RUNS = 30
PIPELINE = ("context", "running", "publishing", "awaiting_review", "merging", "merged")

ALICE = Identity(kind="local", id="alice", display="Alice")
CAROL = Identity(kind="local", id="carol", display="Carol")
ONCALL = Identity(kind="local", id="oncall", display="Oncall")


def agent_text(i: int) -> str:
    # The first and last things the sandboxed shell does: read the wall clock. The start stamp
    # also lands in the change (bench-task-<i>.txt) so it is checked against the published branch.
    return (
        f"s=$(date +%s.%N); echo \"$s\" > bench-task-{i}.txt; "
        f"e=$(date +%s.%N); echo \"agent start=$s end=$e\" > \"$CONVEYOR_SUMMARY_FILE\""
    )


@dataclass
class Sample:
    task_id: str
    to_agent_start: float = 0.0
    agent_s: float = 0.0
    to_merged: float = 0.0
    review_wait: float = 0.0
    transitions: int = 0
    revert_s: float = 0.0
    stage_gaps: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def overhead(self) -> float:
        """Everything but the agent command, the bench's review reaction included."""
        return self.to_merged - self.agent_s

    @property
    def pipeline_overhead(self) -> float:
        """The same without the review reaction (a human's time in production)."""
        return self.overhead - self.review_wait


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 10 samples p95 is the slowest one)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(x: float) -> str:
    return f"{x * 1000:8.1f} ms"


def baseline(argv: list[str]) -> list[float]:
    subprocess.run(argv, check=True, env={})  # warm
    out = []
    for _ in range(BASELINE_RUNS):
        started = time.perf_counter()
        subprocess.run(argv, check=True, env={})
        out.append(time.perf_counter() - started)
    return out


BWRAP_ARGV = [
    shutil.which("bwrap") or "bwrap", "--unshare-all", "--cap-drop", "ALL",
    "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64", "--", "/bin/true",
]  # fmt: skip


async def wait_stage(client, task_id: str, *stages: Stage, timeout: float = 60.0) -> TaskStatus:
    """Poll the ConveyorStage search attribute with describe(): answered by the server alone, so the
    polling does not load the worker (a status query would run on it). Then one status query."""
    wanted = {s.value for s in stages}
    failed = {"failed", "agent_failed", "no_changes", "too_large", "cancelled", "rejected"}
    handle = client.get_workflow_handle(task_id)
    deadline = time.monotonic() + timeout
    stage = None
    while time.monotonic() < deadline:
        stage = (await handle.describe()).typed_search_attributes.get(search.STAGE)
        if stage in wanted:
            return await service.task_status(client, task_id)
        if stage in failed:
            status = await service.task_status(client, task_id)
            raise RuntimeError(f"task {task_id} ended as {stage}: {status.detail}")
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"task {task_id} never reached {sorted(wanted)}; last {stage}")


def stage_times(status: TaskStatus) -> list[tuple[str, float]]:
    return [(e.detail.split(":", 1)[0], e.at.timestamp()) for e in status.audit if e.action == "stage"]


def read_ref(bare: Path, branch: str) -> str:
    """The ref as git stores it; git updates the loose ref by an atomic rename."""
    try:
        return (bare / "refs" / "heads" / branch).read_text().strip()
    except FileNotFoundError:  # packed
        return subprocess.run(
            ["git", "--git-dir", str(bare), "rev-parse", branch], capture_output=True, text=True
        ).stdout.strip()


def commit_message(bare: Path, sha: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(bare), "log", "-1", "--format=%B", sha], capture_output=True, text=True, check=True
    ).stdout


async def one_task(client, settings: Settings, policy: RepoPolicy, bare: Path, i: int) -> Sample:
    request = service.build_request(policy, agent_text(i), ALICE, Origin(source="cli"))
    t0 = time.time()
    result = await service.start_task(client, request, settings)
    task_id = result.task_id
    sample = Sample(task_id)

    review = await wait_stage(client, task_id, Stage.awaiting_review)
    t_approve = time.time()
    await service.signal_task(client, task_id, "approve", Decision(by=CAROL, via="bench", head_sha=review.head_sha))
    merged = await wait_stage(client, task_id, Stage.merged)

    before = read_ref(bare, policy.base)
    t_revert = time.time()
    how = await service.revert_task(client, task_id, Decision(by=ONCALL, via="bench", reason="bench"), settings)
    if how != "signalled":
        raise RuntimeError(f"revert inside the window should be a signal, got {how}")
    deadline = time.monotonic() + 60
    while True:
        head = read_ref(bare, policy.base)
        if head != before:
            t_reverted = time.time()
            if f"Conveyor-Reverts: {task_id}" in commit_message(bare, head):
                break
            before = head  # someone else's commit; keep waiting
        if time.monotonic() > deadline:
            raise RuntimeError(f"task {task_id}: no revert commit on {policy.base} within 60 s")
        await asyncio.sleep(REF_POLL_S)
    sample.revert_s = t_reverted - t_revert
    reverted = await wait_stage(client, task_id, Stage.reverted)
    sample.history, run_agent_scheduled = await history_times(client, task_id)

    # The agent's own stamps, from its summary; cross-checked against the file on the branch.
    fields = dict(part.split("=", 1) for part in merged.summary.split()[1:])
    started, ended = float(fields["start"]), float(fields["end"])
    on_branch = subprocess.run(
        ["git", "--git-dir", str(bare), "show", f"{merged.head_sha}:bench-task-{i}.txt"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if float(on_branch) != started:
        raise RuntimeError(f"task {task_id}: summary start {started} != branch file {on_branch}")
    sample.to_agent_start = started - t0
    sample.agent_s = ended - started

    stages = stage_times(merged)
    names = [name for name, _ in stages]
    if tuple(names) != PIPELINE:
        raise RuntimeError(f"task {task_id}: unexpected stages {names}")
    at = dict(stages)
    sample.to_merged = at["merged"] - t0
    sample.review_wait = max(0.0, t_approve - at["awaiting_review"])
    sample.transitions = len(stages)
    prev_name, prev = "start_task", t0
    for name, when in stages:
        gap = when - prev
        if name == "merging":
            gap -= sample.review_wait  # the bench's reaction time, not the pipeline's
        if name == "publishing":  # split the run stage: into the sandbox, the command, out of it
            sample.stage_gaps["running -> agent cmd start"] = started - at["running"]
            sample.stage_gaps["  running -> run_agent scheduled"] = run_agent_scheduled - at["running"]
            sample.stage_gaps["  run_agent scheduled -> agent cmd start"] = started - run_agent_scheduled
            sample.stage_gaps["agent cmd (own time)"] = ended - started
            sample.stage_gaps["agent cmd end -> publishing"] = when - ended
        else:
            sample.stage_gaps[f"{prev_name} -> {name}"] = gap
        prev_name, prev = name, when
    rstages = dict(stage_times(reverted))
    sample.stage_gaps["revert_task() -> reverting"] = rstages["reverting"] - t_revert
    sample.stage_gaps["reverting -> reverted"] = rstages["reverted"] - rstages["reverting"]
    return sample


async def history_times(client, task_id: str) -> tuple[dict[str, list[float]], float]:
    """Server-side timestamps from the workflow's history: how long workflow tasks wait for the
    worker and take in it, how long each activity takes (scheduled -> completed), and when
    run_agent was scheduled."""
    from temporalio.api.enums.v1 import EventType

    history = await client.get_workflow_handle(task_id).fetch_history()
    out: dict[str, list[float]] = {}
    scheduled: dict[int, tuple[str, float]] = {}
    wft_scheduled = wft_started = run_agent_at = 0.0
    for event in history.events:
        at = event.event_time.ToMicroseconds() / 1e6
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            wft_scheduled = at
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            wft_started = at
            out.setdefault("workflow task: scheduled -> started", []).append(at - wft_scheduled)
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            first = "first workflow task: started -> completed"  # a new run: the workflow sandbox is built
            key = "workflow task: started -> completed" if first in out else first
            out.setdefault(key, []).append(at - wft_started)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[event.event_id] = (name, at)
            if name == "run_agent":
                run_agent_at = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            name, when = scheduled[event.activity_task_completed_event_attributes.scheduled_event_id]
            out.setdefault(f"activity {name}", []).append(at - when)
    return out, run_agent_at


async def components(settings: Settings, policy: RepoPolicy, workspace: Path) -> dict[str, list[float]]:
    """The run stage's own parts, alone and in this process (no worker running): a checkout into a
    warm workspace slot (what run_agent does first) and the sandbox job (agent + patch step)."""
    from adapters.codehost import get_codehost
    from adapters.sandbox import get_sandbox
    from adapters.sandbox.base import Outcome, SandboxJob, SandboxSpec

    host = get_codehost(policy, settings)
    sha = host.resolve_base(policy, policy.base)
    out: dict[str, list[float]] = {"checkout into a warm slot (git)": [], "sandbox job: agent + patch step": [],
                                   "sandbox: one run (agent step)": []}  # fmt: skip
    for i in range(BASELINE_RUNS // 3 + 1):
        started = time.perf_counter()
        await asyncio.to_thread(host.checkout, policy, sha, workspace)
        checkout = time.perf_counter() - started
        sandbox = get_sandbox(policy.sandbox, settings)  # new per run, as run_agent does
        spec = SandboxSpec.from_policy(
            policy.sandbox, workspace, ["/bin/sh", "-c", "date +%s.%N > x.txt"], inputs={"task.md": "x"}, outbox=True
        )
        started = time.perf_counter()
        job = await sandbox.run_job(SandboxJob(base_sha=sha, agent=spec, max_patch_bytes=policy.max_patch_bytes))
        whole = time.perf_counter() - started
        if job.agent.outcome != Outcome.ok or not job.patch:
            raise RuntimeError(f"component sandbox job failed: {job.agent.detail} {job.patch_error}")
        if i:  # the first round warms the slot and the caches
            out["checkout into a warm slot (git)"].append(checkout)
            out["sandbox job: agent + patch step"].append(whole)
            out["sandbox: one run (agent step)"].append(job.agent.duration_s)
    return out


async def run(tasks: int, warmup: int) -> None:
    from workers.main import build_worker

    tmp = Path(tempfile.mkdtemp(prefix="conveyor-benchpipe-"))
    home = tmp / "home"
    home.mkdir()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    port, ui_port = free_port(), free_port()
    os.environ.update(CONVEYOR_HOME=str(home), CONVEYOR_TASK_QUEUE=queue, CONVEYOR_TEMPORAL_PORT=str(port))
    for var in ("SLACK_BOT_TOKEN", "LINEAR_API_KEY", "CONVEYOR_CONFIG", "CONVEYOR_TEMPORAL_ADDRESS", "TEMPORAL_ADDRESS"):
        os.environ.pop(var, None)
    settings = Settings(home=home, task_queue=queue, temporal_port=port, ui_port=ui_port)
    bare = make_repo(tmp / "origin.git", FILES)
    policy = RepoPolicy(
        name="bench",
        url=str(bare),
        invokers=["local:alice"],
        approvers=["local:carol"],
        reverters=["local:oncall"],
        sandbox={"wall_clock_s": 120},
    )

    server = DevServer(settings)
    boot = time.perf_counter()
    server.start()
    try:
        await server.wait_ready()
        boot = time.perf_counter() - boot
        client = await service.connect(settings)

        bare_proc = baseline(["/bin/true"])
        bare_bwrap = baseline(BWRAP_ARGV)
        parts = await components(settings, policy, tmp / "component-ws")

        samples: list[Sample] = []
        warm: list[Sample] = []
        wall = time.perf_counter()
        async with build_worker(client, settings):
            for i in range(warmup + tasks):
                sample = await one_task(client, settings, policy, bare, i)
                (warm if i < warmup else samples).append(sample)
        wall = time.perf_counter() - wall
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    report(samples, warm, bare_proc, bare_bwrap, parts, boot, wall)


def report(samples: list[Sample], warm: list[Sample], bare_proc, bare_bwrap, parts, boot: float, wall: float) -> None:
    n = len(samples)
    p50_bwrap = statistics.median(bare_bwrap)
    print(f"\nConveyor pipeline bench: {n} tasks (+{len(warm)} warm-up, not counted), one embedded stack, "
          f"sequential; dev server ready in {boot:.2f} s; tasks took {wall:.1f} s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work on the machine adds noise)")  # fmt: skip
    print("\nbaselines (same process)                         p50          p95")
    print(f"  bare subprocess /bin/true                 {ms(statistics.median(bare_proc))}  {ms(pct(bare_proc, .95))}")
    print(f"  bare bwrap --unshare-all --cap-drop ALL   {ms(p50_bwrap)}  {ms(pct(bare_bwrap, .95))}")
    print("components alone (same process, before the worker starts)")
    for key, values in parts.items():
        print(f"  {key:<40}  {ms(statistics.median(values))}  {ms(pct(values, .95))}")

    def row(label: str, values: list[float], extra: str = "") -> None:
        print(f"  {label:<40}  {ms(statistics.median(values))}  {ms(pct(values, .95))}  {ms(statistics.mean(values))}{extra}")

    per_transition = [s.overhead / s.transitions for s in samples]
    per_transition_excl = [s.pipeline_overhead / s.transitions for s in samples]
    print("\nper task                                          p50          p95         mean")
    row("1. trigger -> agent command started", [s.to_agent_start for s in samples],
        f"   ({statistics.median([s.to_agent_start for s in samples]) / p50_bwrap:.0f}x a bare bwrap)")  # fmt: skip
    row("   start_task -> merged (audit)", [s.to_merged for s in samples])
    row("   - agent command's own time", [s.agent_s for s in samples])
    row("2. orchestration overhead per task", [s.overhead for s in samples])
    row(f"   per stage transition ({samples[0].transitions} to merged)", per_transition,
        f"   ({statistics.mean(per_transition) / p50_bwrap:.0f}x a bare bwrap)")  # fmt: skip
    row("   of which review reaction (bench)", [s.review_wait for s in samples])
    row("   per transition without it", per_transition_excl)
    row("3. revert_task() -> revert commit on base", [s.revert_s for s in samples])

    print("\nwhere the time goes (audit trail stage times)       p50          p95         mean")
    for key in samples[0].stage_gaps:
        row(" " + key, [s.stage_gaps[key] for s in samples])
    print("\nTemporal history (server timestamps)      n/task       p50          p95         mean   total/task")
    keys = sorted({k for s in samples for k in s.history}, key=lambda k: (not k.startswith(("workflow", "first")), k))
    for key in keys:
        values = [v for s in samples for v in s.history.get(key, [])]
        per_task = sum(values) / n
        print(f"  {key:<38} {len(values) / n:5.1f}  {ms(statistics.median(values))}  {ms(pct(values, .95))}  "
              f"{ms(statistics.mean(values))}  {ms(per_task)}")  # fmt: skip
    if warm:
        w = warm[0]
        print(f"\nwarm-up task (first run: cold workspace clone, imports): trigger->agent {ms(w.to_agent_start).strip()}, "
              f"overhead {ms(w.overhead).strip()}, revert {ms(w.revert_s).strip()}")  # fmt: skip

    mean_transition = statistics.mean(per_transition)
    p95_revert = pct([s.revert_s for s in samples], 0.95)
    p50_start = statistics.median([s.to_agent_start for s in samples])
    print()
    print(f"trigger -> agent started: p50 {p50_start * 1000:.0f} ms, p95 "
          f"{pct([s.to_agent_start for s in samples], .95) * 1000:.0f} ms (no goal set; bare bwrap {p50_bwrap * 1000:.1f} ms)")  # fmt: skip
    verdict = "PASS" if mean_transition < GOAL_TRANSITION_MS / 1000 else "FAIL"
    print(f"{verdict}: orchestration overhead {mean_transition * 1000:.0f} ms per stage transition (mean; "
          f"{statistics.mean(per_transition_excl) * 1000:.0f} ms without the bench's review reaction; "
          f"goal < {GOAL_TRANSITION_MS:.0f} ms)")  # fmt: skip
    verdict = "PASS" if p95_revert < GOAL_REVERT_S else "FAIL"
    print(f"{verdict}: revert signal -> revert commit on base p95 {p95_revert:.2f} s, "
          f"p50 {statistics.median([s.revert_s for s in samples]):.2f} s (goal < {GOAL_REVERT_S:.0f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10, help="measured tasks (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted first tasks (default 1)")
    args = parser.parse_args()
    if args.tasks < 1 or args.warmup < 0:
        parser.error("--tasks must be >= 1 and --warmup >= 0")
    from adapters.sandbox.bubblewrap import BubblewrapSandbox

    if reason := BubblewrapSandbox().available():
        print(f"bench_pipeline: skipped ({reason})")
        return
    asyncio.run(run(args.tasks, args.warmup))


if __name__ == "__main__":
    main()
