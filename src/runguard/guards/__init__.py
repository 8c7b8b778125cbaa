"""Guards: each one holds one ceiling and decides whether a call may go.

A guard knows nothing of HTTP, SDKs or MLflow. It sees the neutral
:class:`~runguard.CallRequest` before a call, each
:class:`~runguard.Attempt` while the SDK sends it (if it implements
``attempted``), the :class:`~runguard.CallResult` after it, and the
:class:`~runguard.Account` of the RunGuard it belongs to (read-only, except
``account.state``, where a guard may keep memory of its own; the ledger calls
guards under its lock, so what a guard reads is consistent).

Write your own by implementing :class:`Guard` and passing it as
``RunGuard(guards=[MyGuard()])``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .artifacts import ArtifactCeiling
from .ceiling import Ceiling
from .context import InputTokensPerCall
from .latency import LlmSeconds, WallSeconds
from .loops import IdenticalRequests, RepeatedToolCalls
from .rate_limits import RateLimits

if TYPE_CHECKING:
    from .._ledger import Account
    from .._records import CallRequest, CallResult, Trip

__all__ = [
    "ArtifactCeiling",
    "Ceiling",
    "Guard",
    "IdenticalRequests",
    "InputTokensPerCall",
    "LlmSeconds",
    "RateLimits",
    "RepeatedToolCalls",
    "WallSeconds",
]


@runtime_checkable
class Guard(Protocol):
    """The protocol every guard implements.

    ``admit`` runs before a call is sent: return a :class:`~runguard.Trip` to
    refuse it (nothing is sent, the RunGuard latches). ``settled`` runs after
    the call's real usage was charged: return a Trip to latch the RunGuard so
    the *next* call is refused. Both run under the ledger's lock: keep them
    O(1) and free of I/O. ``needs_price`` says whether the guard reads
    dollars (then a call whose model has no known price is refused with
    :class:`~runguard.UnknownModelPrice` rather than counted as $0).

    A guard may also define ``attempted(request, attempt, account)``, called
    inside the SDK's retry loop after every attempt of an admitted call that
    was answered with an error status, and after a success that ends a
    streak of 429s (other successes, timeouts and lost connections are not
    reported); a Trip returned there ends the call at once, and no further
    attempt of any call covered by the RunGuard is sent. And ``admitted(request, account)``,
    called once every RunGuard covering the call has admitted it (``admit``
    returning None does not mean the call goes: an outer guard may refuse).
    And ``withdrawn(request, account)``, called when a call ``admitted`` was called for is
    not sent after all (a shared budget refused it, or a later guard's ``admitted``
    raised): undo what ``admitted`` counted.
    And ``admit_artifact(write, account)``, called before each artifact write
    with an :class:`~runguard.ArtifactWrite`: a Trip refuses the write.
    """

    name: str
    needs_price: bool

    def admit(self, request: CallRequest, account: Account) -> Trip | None: ...

    def settled(
        self, request: CallRequest, result: CallResult, account: Account
    ) -> Trip | None: ...
