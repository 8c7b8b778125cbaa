"""The small immutable records that flow between the parts of RunGuard.

A provider describes a call as a :class:`CallRequest`, each HTTP attempt
as an :class:`Attempt`, and what the call returned as a :class:`CallResult`
(its :class:`Usage` and the :class:`ToolCall` s the model asked for); the
ledger charges the usage; a guard that refuses answers with a :class:`Trip`.

The two records made on every call are typed named tuples rather than
frozen dataclasses: equally immutable and typed, but built four times
faster (0.6 µs against 2.4 µs here), which matters on a path whose whole
budget is 15 µs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ._errors import GuardTripped


class CallRequest(NamedTuple):
    """What a guard may know about an LLM call before it is sent.

    ``input_tokens`` is an estimate (see :mod:`runguard.tokens`);
    ``max_output_tokens`` is the request's own output cap times the number of
    completions asked for, or the documented default when the request has no
    cap (``output_capped`` is then False). ``max_cost_usd`` prices that worst
    case; it is ``None`` when the model has no known price.
    """

    provider: str
    endpoint: str
    model: str
    input_tokens: int
    max_output_tokens: int
    output_capped: bool
    stream: bool
    max_cost_usd: float | None
    #: a hash of model, messages (or input) and tools, when a guard asked for one
    fingerprint: int | None = None
    #: the step and role the call was made in (``runguard.step``), for attribution
    step: str | None = None
    role: str | None = None

    @property
    def max_total_tokens(self) -> int:
        return self.input_tokens + self.max_output_tokens


class Usage(NamedTuple):
    """Amounts spent: by one call, or by everything a guard has seen.

    ``input_tokens`` counts every input token the provider processed,
    including cache reads and cache writes (which are also shown on their
    own). ``estimated_calls`` counts calls whose usage the provider did not
    report, so RunGuard charged its own estimate; ``unpriced_calls`` counts
    calls whose model had no known price (charged $0).
    """

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    llm_seconds: float = 0.0
    estimated_calls: int = 0
    unpriced_calls: int = 0
    #: HTTP attempts answered 429 (too many requests), the SDKs' own retries included
    rate_limited_attempts: int = 0
    #: artifact files written to a tracking store on the agent's behalf, and their size
    artifact_writes: int = 0
    artifact_bytes: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class ArtifactWrite(NamedTuple):
    """Files about to be written to an artifact store (an MLflow run's artifacts).

    ``files`` is how many files the write uploads, ``size`` their bytes
    (for an image not yet encoded, its raw size: an upper bound).
    """

    files: int
    size: int
    path: str


class Attempt(NamedTuple):
    """One HTTP attempt of a call (the SDKs retry some failures on their own).

    ``status`` is the HTTP status code. ``retry_after`` is the wait the
    provider asked for, in seconds (from ``retry-after-ms`` or
    ``retry-after``). ``budget_refusal`` holds the provider's message when
    the answer says a spending budget or quota is exhausted, which no retry
    can fix.
    """

    status: int
    retry_after: float | None = None
    budget_refusal: str | None = None


_SPACES = re.compile(r"\s+")


class ToolCall(NamedTuple):
    """A tool the model asked to call, with its arguments in canonical JSON."""

    name: str
    arguments: str

    @classmethod
    def of(cls, name: object, arguments: object) -> ToolCall:
        """Normalise ``arguments`` (a JSON text or a mapping): key order and spacing ignored."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:  # not JSON: compare it with its spacing collapsed
                return cls(str(name), _SPACES.sub(" ", str(arguments)).strip())
        try:
            text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(arguments)
        return cls(str(name), text)

    def __str__(self) -> str:
        shown = self.arguments if len(self.arguments) <= 200 else self.arguments[:197] + "..."
        return f"{self.name}({shown})"


class CallResult(NamedTuple):
    """What one call returned, as the guards see it when it settles."""

    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    #: the model that answered (the response's model name), if it said
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Trip:
    """Why a guard refused: which guard, in plain words, against what limit.

    ``observed`` is the value the run would have reached (or did reach) and
    ``limit`` the ceiling it crossed. ``run`` is the name of the RunGuard the
    guard belongs to.
    """

    guard: str
    reason: str
    limit: float
    observed: float
    run: str | None = None
    exception: type[GuardTripped] | None = field(default=None, repr=False, compare=False)
    #: what the guard saw, for people and dashboards: the repeated tool call,
    #: the provider's ``retry_after`` seconds, the refusal message ...
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.details, MappingProxyType):
            object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def __reduce__(self) -> tuple[Any, ...]:  # a read-only mapping does not pickle
        fields = (self.guard, self.reason, self.limit, self.observed, self.run, self.exception)
        return (type(self), (*fields, dict(self.details)))
