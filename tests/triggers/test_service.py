"""triggers/service.py: ids, connection through temporalio.envconfig, duplicate starts."""

from __future__ import annotations

import pytest

from conveyor.config import Settings
from conveyor.models import Origin
from tests.conftest import person, running_worker, wait_stage
from tests.workflows.test_durability import free_port
from triggers import service


def test_task_ids_derive_from_the_delivery_id():
    assert service.task_id_for("slack", "T1") == service.task_id_for("slack", "T1")
    assert service.task_id_for("slack", "T1") != service.task_id_for("github", "T1")
    assert service.check_task_id(service.task_id_for("x", "y")).startswith("cv-")
    for bad in ("", "cv-", "cv-XYZ", "../cv-000000000000", "cv-000000000000; rm -rf /"):
        with pytest.raises(service.UnknownTask):
            service.check_task_id(bad)


async def test_connect_uses_temporal_address_from_the_environment(client, monkeypatch):
    monkeypatch.setenv("TEMPORAL_ADDRESS", client.service_client.config.target_host)
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "default")
    connected = await service.connect(Settings(temporal_port=free_port()))
    assert connected.service_client.config.target_host == client.service_client.config.target_host
    await connected.count_workflows()


async def test_unreachable_temporal_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TEMPORAL_ADDRESS", raising=False)
    with pytest.raises(service.Unavailable, match="not reachable"):
        await service.connect(Settings(temporal_address=f"127.0.0.1:{free_port()}"))


async def test_a_redelivered_trigger_starts_one_task(client, settings, policy):
    task_id = service.task_id_for("slack", "trigger-123")
    request = service.build_request(policy, "echo x >> README.md", person("alice"), Origin(source="slack"), task_id=task_id)
    async with running_worker(client, settings):
        first = await service.start_task(client, request, settings)
        second = await service.start_task(client, request, settings)
        await wait_stage(client, task_id, service.Stage.awaiting_review)
    assert first.started and not second.started and first.task_id == second.task_id == task_id
    assert [wf.id async for wf in client.list_workflows(f"WorkflowId = '{task_id}'")] == [task_id]


def test_unauthorized_invoker_is_refused(policy):
    with pytest.raises(service.Refused, match="may not start tasks"):
        service.build_request(policy, "echo x", person("mallory"), Origin(source="cli"))


@pytest.mark.parametrize("base", ["main@{1}", "../../config", "-x", "a b", "x.lock", "HEAD~1", "a..b"])
def test_bad_base_branch_is_one_clear_line(policy, base):
    """`base:` comes from the requester (Slack text, --base) and becomes refs/heads/<base>."""
    with pytest.raises(service.BadTask) as err:
        service.build_request(policy, "echo x", person("alice"), Origin(source="slack"), base=base)
    assert str(err.value) == f"{base!r} is not a valid branch name"


def test_task_id_cannot_name_a_path(policy):
    with pytest.raises(service.BadTask, match="not a valid task id"):
        service.build_request(policy, "echo x", person("alice"), Origin(source="cli"), task_id="../../etc/x")
    ok = service.build_request(policy, "echo x", person("alice"), Origin(source="cli"), base="release/1.2")
    assert ok.base == "release/1.2" and ok.task_id.startswith("cv-")
