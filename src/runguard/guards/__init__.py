"""Guards: each one holds one ceiling and decides whether a call may go.

A guard knows nothing of HTTP, SDKs or MLflow. It sees the neutral
:class:`~runguard.CallRequest` before a call, the :class:`~runguard.Usage`
of the call after it, and the :class:`~runguard.Account` of the RunGuard it
belongs to (read-only; the ledger calls guards under its lock, so what a guard
reads is consistent).

Write your own by implementing :class:`Guard` and passing it as
``RunGuard(guards=[MyGuard()])``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .ceiling import Ceiling

if TYPE_CHECKING:
    from .._ledger import Account
    from .._records import CallRequest, Trip, Usage

__all__ = ["Ceiling", "Guard"]


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
    """

    name: str
    needs_price: bool

    def admit(self, request: CallRequest, account: Account) -> Trip | None: ...

    def settled(self, request: CallRequest, usage: Usage, account: Account) -> Trip | None: ...
