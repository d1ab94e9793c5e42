"""Client-side API every trigger uses: start tasks, send signals, read status.

Triggers talk to workflows by name and pydantic types only; they never run activities.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from conveyor.config import RepoPolicy, Settings
from conveyor.models import MAX_TASK_CHARS, Decision, Identity, Origin, Stage, TaskRequest, TaskResult, TaskStatus
from conveyor import search
from conveyor.search import search_attributes_at_start

TASK_WORKFLOW = "AgentTaskWorkflow"
REVERT_WORKFLOW = "RevertTaskWorkflow"
SignalName = Literal["approve", "reject", "cancel", "revert", "checks_changed"]


class ServiceError(Exception):
    """A failure a trigger reports to its user in one line."""


class Refused(ServiceError):
    pass


class BadTask(ServiceError, ValueError):
    pass


class UnknownTask(ServiceError):
    pass


class TaskClosed(ServiceError):
    pass


class Unavailable(ServiceError):
    pass


class StartResult(BaseModel):
    task_id: str
    started: bool
    ui_url: str


def task_id_for(source: str, delivery_id: str) -> str:
    """Deterministic workflow id from the trigger's own delivery/event id: redeliveries dedupe."""
    digest = hashlib.sha256(f"{source}\0{delivery_id}".encode()).hexdigest()[:12]
    return f"cv-{digest}"


def new_task_id() -> str:
    return task_id_for("adhoc", uuid.uuid4().hex)


_TASK_ID_RE = re.compile(r"^(cv-[0-9a-f]{12})$")


def check_task_id(task_id: str) -> str:
    task_id = task_id.strip()
    if not _TASK_ID_RE.match(task_id):
        raise UnknownTask(f"{task_id!r} is not a Conveyor task id (they look like cv-1a2b3c4d5e6f)")
    return task_id


async def connect(settings: Settings | None = None, address: str | None = None) -> Client:
    """Connect with the pydantic converter. Address: explicit, else CONVEYOR_TEMPORAL_ADDRESS,
    else temporalio.envconfig (TEMPORAL_ADDRESS, namespace, API key, TLS), else the embedded server."""
    from temporalio.envconfig import ClientConfig

    settings = settings or Settings()
    connect_config = ClientConfig.load_client_connect_config()
    target = address or settings.temporal_address or connect_config.get("target_host")
    connect_config["target_host"] = target or f"127.0.0.1:{settings.temporal_port}"
    connect_config.setdefault("namespace", settings.namespace)
    try:
        return await Client.connect(**connect_config, data_converter=pydantic_data_converter)
    except Exception as exc:  # connection refused, TLS, auth
        raise Unavailable(f"Temporal is not reachable at {connect_config['target_host']}: {exc}") from exc


def build_request(
    repo: RepoPolicy,
    text: str,
    requester: Identity,
    origin: Origin,
    base: str | None = None,
    agent: str | None = None,
    task_id: str | None = None,
) -> TaskRequest:
    """Validate and authorize a task before anything starts."""
    if not text or not text.strip():
        raise BadTask("the task text is empty: say what the agent should do")
    if len(text) > MAX_TASK_CHARS:
        raise BadTask(f"the task text is {len(text):,} characters; the limit is {MAX_TASK_CHARS:,}")
    if not repo.allows("invokers", requester.principal, requester.id):
        raise Refused(f"{requester} may not start tasks on {repo.name}")
    try:
        return TaskRequest(
            task_id=task_id or new_task_id(),
            repo=repo,
            base=base or repo.base,
            text=text,
            requester=requester,
            origin=origin,
            agent=agent or repo.agent,
        )
    except ValidationError as exc:
        raise BadTask(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


async def start_task(client: Client, request: TaskRequest, settings: Settings) -> StartResult:
    """Start the task workflow; a second start with the same id is a no-op (dedupe)."""
    try:
        await client.start_workflow(
            TASK_WORKFLOW,
            request,
            id=request.task_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=search_attributes_at_start(request),
            memo={"text": request.text[:200], "base": request.base},
            static_summary=f"{request.repo.name}: {request.text[:180]}",
        )
        started = True
    except WorkflowAlreadyStartedError:
        started = False
    except RPCError as exc:
        raise Unavailable(f"could not start the task: {exc.message}") from exc
    return StartResult(task_id=request.task_id, started=started, ui_url=settings.task_ui_url(request.task_id))


async def _describe(client: Client, task_id: str):
    try:
        return await client.get_workflow_handle(task_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise UnknownTask(f"no task {task_id}") from None
        raise Unavailable(f"Temporal error: {exc.message}") from exc


async def signal_task(client: Client, task_id: str, signal: SignalName, decision: Decision) -> None:
    task_id = check_task_id(task_id)
    handle = client.get_workflow_handle(task_id)
    try:
        await handle.signal(signal, decision)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            desc = await _describe(client, task_id)  # raises UnknownTask when it never existed
            raise TaskClosed(f"task {task_id} is already finished ({desc.status.name.lower()})") from None
        raise Unavailable(f"Temporal error: {exc.message}") from exc


async def closed_result(client: Client, task_id: str) -> TaskResult | None:
    """The result of a task whose workflow completed; None if it failed/terminated without one."""
    try:
        return await client.get_workflow_handle(task_id, result_type=TaskResult).result()
    except WorkflowFailureError:
        return None


async def revert_task(client: Client, task_id: str, decision: Decision, settings: Settings) -> str:
    """Revert a merged task: signal it inside its revert window, else start the after-close path.

    Returns "signalled", "started" or "already" (a revert for this task was already started).
    """
    task_id = check_task_id(task_id)
    desc = await _describe(client, task_id)
    if desc.status == WorkflowExecutionStatus.RUNNING:
        try:
            await client.get_workflow_handle(task_id).signal("revert", decision)
            return "signalled"
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise Unavailable(f"Temporal error: {exc.message}") from exc
            # closed between describe and signal: fall through to the after-close path
    result = await closed_result(client, task_id)
    if result is None:
        raise TaskClosed(f"task {task_id} did not finish normally; nothing to revert")
    status = result.status
    if status.stage.value in ("reverting", "reverted"):
        return "already"
    if not result.repo.allows("reverters", decision.by.principal, decision.by.id):
        raise Refused(f"{decision.by} may not revert tasks on {result.repo.name}")
    if not status.merge_sha:
        raise TaskClosed(f"task {task_id} was never merged (stage {status.stage.value}); nothing to revert")
    from conveyor.models import RevertRequest

    request = RevertRequest(
        task_id=task_id,
        repo=result.repo,
        base=status.base,
        merge_sha=status.merge_sha,
        decision=decision,
        original=status,
        requester=result.requester,
        origin=result.origin,
        refs=result.refs,
    )
    try:
        await client.start_workflow(
            REVERT_WORKFLOW,
            request,
            id=f"{task_id}-revert",
            task_queue=settings.task_queue,
            # a failed revert (conflict, refusal) may be retried; a completed one is final
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
            execution_timeout=timedelta(hours=1),
        )
        return "started"
    except WorkflowAlreadyStartedError:
        return "already"


async def task_status(client: Client, task_id: str) -> TaskStatus:
    task_id = check_task_id(task_id)
    desc = await _describe(client, task_id)
    handle = client.get_workflow_handle(task_id)
    if desc.status == WorkflowExecutionStatus.RUNNING:
        return await handle.query("status", result_type=TaskStatus)
    result = await closed_result(client, task_id)
    if result is not None:
        status = result.status
        revert = await _revert_status(client, task_id)
        if revert is not None:
            status = revert
        return status
    try:  # failed or terminated: the query still answers from history
        return await handle.query("status", result_type=TaskStatus)
    except Exception:
        raise TaskClosed(f"task {task_id} ended as {desc.status.name.lower()}") from None


async def _revert_status(client: Client, task_id: str) -> TaskStatus | None:
    try:
        handle = client.get_workflow_handle(f"{task_id}-revert")
        desc = await handle.describe()
    except RPCError:
        return None
    if desc.status == WorkflowExecutionStatus.RUNNING:
        return await handle.query("status", result_type=TaskStatus)
    try:
        return (await client.get_workflow_handle(f"{task_id}-revert", result_type=TaskResult).result()).status
    except WorkflowFailureError:
        return None


async def list_tasks(client: Client, requester_principal: str | None = None, limit: int = 20) -> list[TaskStatus]:
    """Recent tasks from visibility (search attributes + memo): no worker needed, no query per task."""
    query = f"WorkflowType = '{TASK_WORKFLOW}'"
    if requester_principal:
        safe = requester_principal.replace("'", "")
        query += f" AND ConveyorRequester = '{safe}'"
    out: list[TaskStatus] = []
    try:
        async for wf in client.list_workflows(query, limit=limit):
            attrs = wf.typed_search_attributes
            memo = await wf.memo()
            out.append(
                TaskStatus(
                    task_id=wf.id,
                    repo=attrs.get(search.REPO) or "",
                    base=str(memo.get("base", "")),
                    text=str(memo.get("text", "")),
                    requester=attrs.get(search.REQUESTER) or "",
                    source=attrs.get(search.SOURCE) or "",
                    stage=Stage(attrs.get(search.STAGE) or "received"),
                )
            )
    except RPCError as exc:
        raise Unavailable(f"Temporal error: {exc.message}") from exc
    return out
