"""RunGuard: an in-process circuit breaker for LLM agents.

Inside ``with RunGuard(...)`` or a ``@guarded`` function, every call the
``openai`` and ``anthropic`` SDKs make is admitted before it is sent and
charged when it returns; the first ceiling that would be crossed refuses
the call with a typed exception, and nothing leaves the process.
:func:`guarded_evaluate` runs an MLflow evaluation inside a fitted budget.
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
from .evaluate import EvalEstimate, GuardedEvaluation, estimate_eval_calls, guarded_evaluate
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
    "EvalEstimate",
    "GuardedEvaluation",
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
    "estimate_eval_calls",
    "guarded",
    "guarded_evaluate",
    "instrument",
    "propagate",
    "step",
]
