"""One LLM call in flight: admitted with its worst case, settled with what it really used.

Provider modules describe the call and report what the provider said; this
module prices it, asks the ledger to admit it, and settles it exactly once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from contextvars import Token
from typing import Any

from . import budgets
from ._background import Background
from ._errors import UnknownModelPrice
from ._ledger import LEDGER, Account, Reservation
from ._records import CallRequest, CallResult, ToolCall, Usage
from .alerts import deliver
from .pricing import Rates, rates_for
from .steps import current_step
from .stores import Amounts

#: Output tokens reserved for a request that sets no output cap of its own.
DEFAULT_OUTPUT_TOKENS = 4096

log = logging.getLogger("runguard")

#: settlements that could not run where they were started (see Call.finish)
_deferred = Background("runguard-settle", exit_wait=5.0)
_held_here = LEDGER.held_here


def settle_deferred(timeout: float) -> bool:
    """Wait for deferred settlements; True when none is left."""
    return _deferred.drain(timeout)


#: Builds a named tuple from all its fields at once. A named tuple's own
#: constructor is a Python function; the records made on every call skip it.
_new: Any = tuple.__new__


class Call(Reservation):
    """What is known about one admitted call; usage fields keep the largest value seen.

    Providers report usage cumulatively (an Anthropic stream repeats and
    grows its counts; a raw response may be parsed twice), so keeping the
    maximum per field never double counts.
    """

    __slots__ = (
        "attempting",
        "cache_read_tokens",
        "cache_write_tokens",
        "deferred",
        "hide_usage_chunk",
        "input_tokens",
        "leases",
        "llm_seconds",
        "model",
        "options",
        "output_tokens",
        "overrides",
        "pending_tools",
        "rates",
        "raw",
        "reading",
        "reported",
        "settle_on_body",
        "started",
        "token",
        "tool_calls",
    )

    # Set by the SDK hook around request(), which runs inside the call, when
    # it admits the call: the options it sends, its mark in the context, and
    # when it started (perf_counter).
    options: Any
    token: Token[Call | None]
    started: float

    def __init__(
        self,
        accounts: tuple[Account, ...],
        request: CallRequest,
        rates: Rates | None,
        overrides: tuple[Mapping[str, Rates | str], ...],
    ) -> None:
        # Reservation's fields (it has no __init__: one call less per LLM call)
        self.accounts = accounts
        self.request = request
        self.open = False
        self.rates = rates
        self.overrides = overrides
        self.llm_seconds = 0.0
        self.model: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.reported = False
        #: a chat-completion stream whose usage chunk RunGuard asked for
        self.hide_usage_chunk = False
        #: settled when its body has been read, not when request() returns
        self.deferred = False
        #: a body read after the call returned (``with_streaming_response``)
        self.settle_on_body = False
        #: a stream read in progress (its response closes itself when exhausted)
        self.reading = False
        #: the SDK's raw-response mode, when the caller asked for the HTTP response
        self.raw: str | None = None
        #: one of its HTTP attempts is being sent
        self.attempting = False
        #: the tool calls of the answer, collected only when a loop guard needs them
        wanted = (
            accounts[0].needs_tool_calls
            if len(accounts) == 1
            else any(a.needs_tool_calls for a in accounts)
        )
        self.tool_calls: list[ToolCall] | None = [] if wanted else None
        #: tool calls a stream delivers in pieces: key -> [name, arguments so far]
        self.pending_tools: dict[object, list[str]] | None = None
        #: the shared budgets' holds on this call
        self.leases: Sequence[budgets.Lease] = ()

    def observe(
        self,
        model: object,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        final: bool = True,
    ) -> None:
        """Record usage the provider reported; ``final`` once the counts are complete."""
        if isinstance(model, str) and model:
            self.model = model
        # comparisons rather than max(): this runs for every body and event
        if input_tokens > self.input_tokens:
            self.input_tokens = input_tokens
        if output_tokens > self.output_tokens:
            self.output_tokens = output_tokens
        if cache_read_tokens > self.cache_read_tokens:
            self.cache_read_tokens = cache_read_tokens
        if cache_write_tokens > self.cache_write_tokens:
            self.cache_write_tokens = cache_write_tokens
        if final:
            self.reported = True
            if self.settle_on_body:
                self.finish()

    def finish(self, failed: bool = False) -> None:
        """Settle the call (once; later calls do nothing)."""
        if not self.open:
            return
        if _held_here():
            # The garbage collector freed this call's abandoned stream in the middle of
            # a ledger method of this very thread; settling now would re-enter it.
            _deferred.submit(functools.partial(self.finish, failed))
            return
        try:
            usage = self._usage(failed)
        except Exception:  # accounting must never break the agent's call
            log.exception("runguard: could not compute usage; charging the reservation")
            request = self.request
            usage = Usage(
                calls=1,
                input_tokens=request.input_tokens,
                output_tokens=request.max_output_tokens,
                cost_usd=request.max_cost_usd or 0.0,
                estimated_calls=1,
            )
        tool_calls = self.tool_calls
        if self.pending_tools and tool_calls is not None:
            # arguments streamed in pieces; a tool without arguments streams none
            pending = self.pending_tools.values()
            tool_calls.extend(ToolCall.of(name, args or "{}") for name, args in pending)
        result = _new(CallResult, (usage, tuple(tool_calls) if tool_calls else (), self.model))
        alerts = LEDGER.settle(self, result)
        if self.leases:
            spent = Amounts(usage.calls, usage.input_tokens, usage.output_tokens, usage.cost_usd)
            alerts += budgets.settle(self.leases, spent)
            self.leases = ()
        for alert, on_alert in alerts:
            deliver(alert, on_alert)

    def release(self) -> None:
        """Drop the reservation of a call that was never sent; nothing is charged."""
        LEDGER.release(self)
        if self.leases:
            budgets.release(self.leases)
            self.leases = ()

    def _usage(self, failed: bool) -> Usage:
        request = self.request
        estimated = not self.reported and not failed
        input_tokens = self.input_tokens
        output_tokens = self.output_tokens
        if estimated:
            # Usage never arrived (an abandoned stream, a provider that sends
            # none): charge the worst case that was reserved for what is missing.
            input_tokens = input_tokens or request.input_tokens
            output_tokens = max(output_tokens, request.max_output_tokens)
        rates = self.rates
        if self.model is not None and self.model != request.model:
            rates = rates_for(request.provider, self.model, self.overrides) or rates
        if rates is None:
            cost = 0.0
        else:
            cost = rates.cost(
                input_tokens, output_tokens, self.cache_read_tokens, self.cache_write_tokens
            )
        usage: Usage = _new(
            Usage,
            (
                1,
                input_tokens,
                output_tokens,
                self.cache_read_tokens,
                self.cache_write_tokens,
                cost,
                self.llm_seconds,
                1 if estimated else 0,
                1 if rates is None and (input_tokens or output_tokens) else 0,
                0,
                0,
                0,
            ),
        )
        return usage


def start_call(
    accounts: tuple[Account, ...],
    provider: str,
    endpoint: str,
    model: str,
    input_tokens: int,
    max_output_tokens: int | None,
    stream: bool,
    fingerprint: int | None = None,
) -> Call:
    """Price the worst case of a call and admit it in every account, or raise."""
    capped = max_output_tokens is not None
    output = max_output_tokens if max_output_tokens is not None else DEFAULT_OUTPUT_TOKENS
    if len(accounts) == 1:
        prices = accounts[0].prices
        overrides: tuple[Mapping[str, Rates | str], ...] = (prices,) if prices else ()
    else:
        overrides = tuple(a.prices for a in accounts if a.prices)
    rates = rates_for(provider, model, overrides)
    if rates is None:
        if any(a.needs_price for a in accounts):
            raise UnknownModelPrice(provider, model)
        worst = None
    else:
        worst = rates.cost(input_tokens, output)
    step, role = current_step()
    request = _new(
        CallRequest,
        (
            provider,
            endpoint,
            model,
            input_tokens,
            output,
            capped,
            stream,
            worst,
            fingerprint,
            step,
            role,
        ),
    )
    call = Call(accounts, request, rates, overrides)
    LEDGER.admit(call)
    shared = _budgets(accounts) if len(accounts) > 1 or accounts[0].budgets else None
    if shared:
        try:
            call.leases = budgets.reserve(shared, request, LEDGER.snapshot)
        except BaseException:
            call.release()
            raise
    return call


def _budgets(accounts: tuple[Account, ...]) -> list[tuple[budgets.Budget, Account]]:
    """Every budget listed by a covering RunGuard, once each, innermost first."""
    found: list[tuple[budgets.Budget, Account]] = []
    for account in accounts:
        for budget in account.budgets:
            if all(budget is not b for b, _ in found):
                found.append((budget, account))
    return found
