"""Credential endpoints: the model API key is added outside the sandbox and never enters it."""

from __future__ import annotations

import json

import pytest

from adapters.sandbox.base import Outcome, SandboxSpec
from adapters.sandbox.bubblewrap import BubblewrapSandbox
from adapters.sandbox.model_proxy import PLACEHOLDER_KEY, credential_env, sandbox_base_url
from tests.adapters.sandbox.conftest import needs_bwrap
from tests.adapters.sandbox.helpers import Origin

pytestmark = needs_bwrap

KEY = "sk-ant-test-4b1d9e0c7a"

CLIENT = r'''
import json, os, urllib.request
req = urllib.request.Request(
    os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages",
    data=json.dumps({"model": "m", "messages": []}).encode(),
    headers={"content-type": "application/json", "x-api-key": os.environ["ANTHROPIC_API_KEY"],
             "authorization": "Bearer sandbox-chosen", "anthropic-version": "2023-06-01"},
)
print(urllib.request.urlopen(req, timeout=5).read().decode())
'''


def test_credential_env_for_the_agent() -> None:
    env = credential_env(["ANTHROPIC_API_KEY"])
    assert env == {"ANTHROPIC_BASE_URL": "http://127.0.0.1:3129", "ANTHROPIC_API_KEY": PLACEHOLDER_KEY}
    assert sandbox_base_url("OPENAI_API_KEY") == "http://127.0.0.1:3130/v1"


async def test_key_added_outside_never_inside(repo) -> None:
    ws, _ = repo
    upstream = Origin()
    try:
        sandbox = BubblewrapSandbox(environ={"ANTHROPIC_API_KEY": KEY, "CONVEYOR_ANTHROPIC_UPSTREAM": upstream.url + "/gw"})
        if sandbox.available():
            pytest.skip(sandbox.available())
        script = (
            'python3 -c "$CLIENT"; echo ---; env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline;'
            "find /run /tmp /workspace /etc -type f -size -2M -exec cat {} + 2>/dev/null; echo end"
        )
        spec = SandboxSpec(workspace=ws, argv=["/bin/sh", "-c", script], env={"CLIENT": CLIENT},
                           secrets=["ANTHROPIC_API_KEY"], memory_mb=256, wall_clock_s=10)
        result = await sandbox.run(spec)
    finally:
        upstream.close()
    assert result.outcome == Outcome.ok, result.output[-2000:]
    assert result.output.startswith(b"hello POST /gw/v1/messages"), result.output[:500]
    assert KEY.encode() not in result.output  # not in env, argv (bwrap's included), or any file
    assert b"ANTHROPIC_BASE_URL=http://127.0.0.1:3129" in result.output
    [(method, path, headers, body)] = upstream.requests
    assert (method, path) == ("POST", "/gw/v1/messages")
    assert headers["x-api-key"] == KEY and "authorization" not in headers
    assert headers["host"] == f"127.0.0.1:{upstream.port}" and json.loads(body)["model"] == "m"
    assert result.egress == ["allow model ANTHROPIC_API_KEY POST /v1/messages"]
