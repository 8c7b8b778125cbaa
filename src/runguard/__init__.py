"""RunGuard: an in-process circuit breaker for LLM agents.

Inside ``with RunGuard(...)`` or a ``@guarded`` function, every call the
``openai`` and ``anthropic`` SDKs make is admitted before it is sent and
charged when it returns; the first ceiling that would be crossed refuses
the call with a typed exception, and nothing leaves the process.
"""

from ._errors import (
    BudgetExceeded,
    GuardTripped,
    InstrumentationError,
    RunGuardError,
    UnknownModelPrice,
)
from ._guard import RunGuard, current_guard, guarded, propagate
from ._ledger import Account
from ._records import CallRequest, Trip, Usage
from .pricing import Price
from .providers import instrument

__all__ = [
    "Account",
    "BudgetExceeded",
    "CallRequest",
    "GuardTripped",
    "InstrumentationError",
    "Price",
    "RunGuard",
    "RunGuardError",
    "Trip",
    "UnknownModelPrice",
    "Usage",
    "current_guard",
    "guarded",
    "instrument",
    "propagate",
]
