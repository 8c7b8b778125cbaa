"""``max_input_tokens_per_call``: no single call may carry more than this much input."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import ContextOverflow
from .._records import CallRequest, CallResult, Trip
from ._inert import inert

if TYPE_CHECKING:
    from .._ledger import Account


class InputTokensPerCall:
    """Refuses, before it is sent, a call whose estimated input exceeds ``limit`` tokens.

    This catches a history that has grown past what the agent should ever
    send (and what each later call would pay again). The estimate is the
    one the call is admitted with (see ``runguard.tokens``).
    """

    __slots__ = ("limit", "name", "needs_price")

    def __init__(self, limit: int, name: str = "max_input_tokens_per_call") -> None:
        self.name = name
        self.limit = limit
        self.needs_price = False

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        tokens = request.input_tokens
        if tokens <= self.limit:
            return None
        return Trip(
            guard=self.name,
            reason=(
                f"this {request.provider} call to {request.model} would send about "
                f"{tokens:,} input tokens, over the limit of {self.limit:,} for one call"
            ),
            limit=self.limit,
            observed=tokens,
            exception=ContextOverflow,
        )

    @inert
    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        return None

    def __repr__(self) -> str:
        return f"InputTokensPerCall({self.limit!r})"
