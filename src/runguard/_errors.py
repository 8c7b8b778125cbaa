"""Exceptions raised by RunGuard.

None of them subclasses an SDK error, and no message contains the words the
SDKs or MLflow's evaluation harness treat as retryable (a status code such as
429, or "rate limit"): a refused call must never be retried by a layer below.
"""

from __future__ import annotations

import re

from ._records import Trip, Usage

# MLflow's evaluation harness retries any exception whose text contains "429"
# or "rate limit". Limits, observed values and user-chosen names can spell
# either by accident; an invisible word joiner, or a no-break space, keeps
# the message readable while matching neither.
_RETRYABLE = re.compile(r"429|rate limit", re.IGNORECASE)


def _defuse(match: re.Match[str]) -> str:
    text = match.group()
    return "42\u20609" if text == "429" else text.replace(" ", "\u00a0")


class RunGuardError(Exception):
    """Base class of every exception RunGuard raises on purpose."""


class GuardTripped(RunGuardError):
    """A guard refused an LLM call; nothing was sent.

    ``trip`` says which guard, why, the limit and the observed value;
    ``usage`` is what the tripped RunGuard had spent at that moment.
    """

    def __init__(self, trip: Trip, usage: Usage) -> None:
        self.trip = trip
        self.usage = usage
        super().__init__(describe(trip))

    def __reduce__(self) -> tuple[type[GuardTripped], tuple[Trip, Usage]]:
        return (type(self), (self.trip, self.usage))


class BudgetExceeded(GuardTripped):
    """A call, token or dollar ceiling would have been crossed."""


class UpstreamBudgetExceeded(BudgetExceeded):
    """The provider or a gateway refused a call because a spending budget or quota is spent.

    Raised on the first such answer (HTTP 402, or a refusal whose body says
    the budget or quota is exhausted): retrying cannot succeed until the
    budget resets, so the SDK's pending retries are not sent.
    """


class ArtifactBudgetExceeded(BudgetExceeded):
    """An artifact write would have crossed ``max_artifact_writes`` or ``max_artifact_bytes``.

    Raised from the write (``mlflow.log_text``, ``MlflowClient.log_artifact``
    ...): nothing was uploaded.
    """


class BudgetUnavailable(GuardTripped):
    """A shared budget's store could not be reached, so the call was not sent.

    Budgets fail closed by default; ``Budget(..., on_store_error="allow")``
    lets calls through (with a warning) instead. This refusal does not latch
    the RunGuard: the next call asks the store again.
    """


class RateLimitStorm(GuardTripped):
    """Too many HTTP attempts were answered "too many requests" (status 429).

    Every attempt counts, the SDKs' own retries included; when this is
    raised, the SDK's remaining retries are not sent.
    """


class LatencyBudgetExceeded(GuardTripped):
    """The time spent in LLM calls, or the guard's lifetime, reached its ceiling."""


class LoopDetected(GuardTripped):
    """The agent repeated itself: the same tool call, or the same request, too often."""


class ContextOverflow(GuardTripped):
    """One call's estimated input was larger than ``max_input_tokens_per_call``."""


class UnknownModelPrice(RunGuardError, LookupError):
    """A dollar ceiling is active but the call's model has no known price."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        super().__init__(
            f"RunGuard has no price for {provider} model {model!r}, and a dollar ceiling "
            f"(max_cost_usd) is active, so the call was not sent. Supply one with "
            f"RunGuard(prices={{{model!r}: runguard.Price(input=..., output=...)}}) "
            f"(USD per million tokens), or map it to a known model with "
            f"prices={{{model!r}: 'gpt-4o'}}."
        )

    def __reduce__(self) -> tuple[type[UnknownModelPrice], tuple[str, str]]:
        # a process pool pickles it back to the parent: rebuild from the fields
        return (type(self), (self.provider, self.model))


class InstrumentationError(RunGuardError):
    """An installed SDK no longer has the private methods RunGuard hooks.

    Raised instead of running unguarded: a guard that cannot see calls would
    count silently wrong.
    """


def describe(trip: Trip) -> str:
    """The message of a trip, in words no retry rule below RunGuard matches."""
    where = f"RunGuard {trip.run!r}" if trip.run else "RunGuard"
    return _RETRYABLE.sub(_defuse, f"{where}: {trip.guard} tripped: {trip.reason}")
