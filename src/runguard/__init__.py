"""RunGuard: an in-process circuit breaker for LLM agents.

Inside ``with RunGuard(...)`` or a ``@guarded`` function, every call the
``openai`` and ``anthropic`` SDKs make is admitted before it is sent and
charged when it returns; the first ceiling that would be crossed refuses
the call with a typed exception, and nothing leaves the process.
"""

from ._errors import (
    ArtifactBudgetExceeded,
    BudgetExceeded,
    BudgetUnavailable,
    ContextOverflow,
    GuardTripped,
    InstrumentationError,
    LatencyBudgetExceeded,
    LoopDetected,
    RateLimitStorm,
    RunGuardError,
    UnknownModelPrice,
    UpstreamBudgetExceeded,
)
from ._guard import RunGuard, current_guard, guarded, propagate
from ._ledger import Account
from ._records import ArtifactWrite, Attempt, CallRequest, CallResult, ToolCall, Trip, Usage
from .alerts import Alert
from .budgets import Budget
from .pricing import Price
from .providers import instrument
from .steps import Breakdown, step

__all__ = [
    "Account",
    "Alert",
    "ArtifactBudgetExceeded",
    "ArtifactWrite",
    "Breakdown",
    "Budget",
    "BudgetUnavailable",
    "Attempt",
    "BudgetExceeded",
    "CallRequest",
    "CallResult",
    "ContextOverflow",
    "GuardTripped",
    "InstrumentationError",
    "LatencyBudgetExceeded",
    "LoopDetected",
    "Price",
    "RateLimitStorm",
    "RunGuard",
    "RunGuardError",
    "ToolCall",
    "Trip",
    "UnknownModelPrice",
    "UpstreamBudgetExceeded",
    "Usage",
    "current_guard",
    "guarded",
    "instrument",
    "propagate",
    "step",
]
