"""Conveyor's search attributes: what an operator filters on in the Temporal UI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

if TYPE_CHECKING:
    from conveyor.models import TaskRequest

REPO = SearchAttributeKey.for_keyword("ConveyorRepo")
STAGE = SearchAttributeKey.for_keyword("ConveyorStage")
REQUESTER = SearchAttributeKey.for_keyword("ConveyorRequester")
SOURCE = SearchAttributeKey.for_keyword("ConveyorSource")

ALL_KEYS = (REPO, STAGE, REQUESTER, SOURCE)


def search_attributes_at_start(request: "TaskRequest") -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(REPO, request.repo.name),
            SearchAttributePair(STAGE, "received"),
            SearchAttributePair(REQUESTER, request.requester.principal),
            SearchAttributePair(SOURCE, request.origin.source),
        ]
    )


def dev_server_args() -> list[str]:
    """`temporal server start-dev` flags that register the attributes."""
    args: list[str] = []
    for key in ALL_KEYS:
        args += ["--search-attribute", f"{key.name}=Keyword"]
    return args
