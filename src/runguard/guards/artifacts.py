"""Artifact write ceilings (``max_artifact_writes``, ``max_artifact_bytes``).

An agent that saves something on every step (a tool's output, a plot, a
table) turns a loop into thousands of uploads. These guards see each write
as a neutral :class:`~runguard.ArtifactWrite` — how many files, how many
bytes — before it is made, and refuse the one that would cross the ceiling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .._errors import ArtifactBudgetExceeded
from .._records import ArtifactWrite, CallRequest, CallResult, Trip
from ._inert import inert

if TYPE_CHECKING:
    from .._ledger import Account


class ArtifactCeiling:
    """Refuses the artifact write that would take files or bytes written above ``limit``.

    LLM calls are not its business: ``admit`` and ``settled`` always let them
    go (once it trips, the RunGuard is latched, so later calls are refused
    like after any trip).
    """

    __slots__ = ("limit", "metric", "name")
    needs_price = False

    def __init__(self, metric: Literal["artifact_writes", "artifact_bytes"], limit: int) -> None:
        self.metric = metric
        self.name = f"max_{metric}"
        self.limit = limit

    @inert
    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        return None

    @inert
    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        return None

    def admit_artifact(self, write: ArtifactWrite, account: Account) -> Trip | None:
        if self.metric == "artifact_writes":
            spent, ask, noun = account.artifact_writes, write.files, "artifact files"
        else:
            spent, ask, noun = account.artifact_bytes, write.size, "artifact bytes"
        if spent + ask <= self.limit:
            return None
        return Trip(
            guard=self.name,
            reason=(
                f"writing {write.path!r} would bring {noun} written to {spent + ask:,}, "
                f"over the limit of {self.limit:,} ({spent:,} written)"
            ),
            limit=self.limit,
            observed=spent + ask,
            exception=ArtifactBudgetExceeded,
            details={"path": write.path, "files": write.files, "bytes": write.size},
        )

    def __repr__(self) -> str:
        return f"ArtifactCeiling({self.metric!r}, {self.limit!r})"
