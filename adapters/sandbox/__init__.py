"""Sandboxes: `get_sandbox(policy, settings)` picks the backend named by the repo's policy."""

from __future__ import annotations

from adapters.sandbox.base import Sandbox, SandboxError
from conveyor.config import SandboxPolicy, Settings


def get_sandbox(policy: SandboxPolicy, settings: Settings) -> Sandbox:
    """local -> BubblewrapSandbox, modal -> ModalSandbox. Availability is checked per run
    (`available()`; runs are refused, never run unsandboxed)."""
    if policy.backend == "local":
        from adapters.sandbox.bubblewrap import BubblewrapSandbox

        return BubblewrapSandbox(scratch_dir=None)
    if policy.backend == "modal":
        from adapters.sandbox.modal_sandbox import ModalSandbox

        return ModalSandbox(settings=settings)
    raise SandboxError(f"unknown sandbox backend {policy.backend!r}")
