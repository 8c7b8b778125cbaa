"""A yardstick for ``overhead.py`` and ``instructions.py``: about the least a guard in Python adds.

One hook on the client's ``request()``, compiled the way RunGuard compiles its
own, does the bare work of the five ceilings for a non-streaming chat
completion:
- it estimates the input from the length of the messages' texts (4 characters
  a token);
- under a lock, it checks calls, input, output and total tokens and dollars
  against their ceilings, and reserves the worst case;
- it sends;
- then it releases the reservation and charges the usage the parsed result
  reports.

Everything else RunGuard does on that call is left out: the per-attempt hook
(429s), streams and raw responses, nested and process-wide guards, steps,
shared budgets, alerts, exact token counts, tool calls and fingerprints. This
is not a guard to use. It shows how much of what RunGuard adds any hook
written in Python would add on this machine.
"""

from __future__ import annotations

import threading
import types
from contextvars import ContextVar
from time import perf_counter
from typing import Any

from runguard.pricing import rates_for
from runguard.providers._hooks import Split, hooked

HUGE = 10**12


class Refused(Exception):
    pass


class Ceilings:
    """Five ceilings, and what has been spent and held against them."""

    __slots__ = (
        "calls",
        "cost",
        "fed",
        "held_calls",
        "held_cost",
        "held_fed",
        "held_made",
        "input_rate",
        "lock",
        "made",
        "max_calls",
        "max_cost",
        "max_fed",
        "max_made",
        "max_total",
        "output_rate",
        "seconds",
    )

    def __init__(
        self,
        model: str,
        max_calls: int = HUGE,
        max_fed: int = HUGE,
        max_made: int = HUGE,
        max_total: int = HUGE,
        max_cost: float = 1e9,
    ) -> None:
        self.lock = threading.Lock()
        self.max_calls, self.max_fed, self.max_made = max_calls, max_fed, max_made
        self.max_total, self.max_cost = max_total, max_cost
        self.calls = self.fed = self.made = self.held_calls = self.held_fed = self.held_made = 0
        self.cost = self.held_cost = self.seconds = 0.0
        rates = rates_for("openai", model)
        assert rates is not None, model
        self.input_rate, self.output_rate = rates.input, rates.output


active: ContextVar[Ceilings | None] = ContextVar("minimal_guard", default=None)


def _before(client: Any, options: Any) -> tuple[Any, ...] | None:
    ceilings = active.get()
    if ceilings is None:
        return None
    body = options.json_data
    if options.url != "/chat/completions" or body.get("stream"):
        return None
    chars = 0
    messages = body["messages"]
    for message in messages:
        for value in message.values():
            if type(value) is str:
                chars += len(value)
        for tool_call in message.get("tool_calls") or ():
            function = tool_call["function"]
            chars += len(function["name"]) + len(function["arguments"])
    fed = chars // 4 + 3 * len(messages) + 3
    made = body.get("max_tokens") or 4096
    worst = fed * ceilings.input_rate + made * ceilings.output_rate
    with ceilings.lock:
        if (
            ceilings.calls + ceilings.held_calls + 1 > ceilings.max_calls
            or ceilings.fed + ceilings.held_fed + fed > ceilings.max_fed
            or ceilings.made + ceilings.held_made + made > ceilings.max_made
            or ceilings.fed + ceilings.made + ceilings.held_fed + ceilings.held_made + fed + made
            > ceilings.max_total
            or ceilings.cost + ceilings.held_cost + worst > ceilings.max_cost
        ):
            raise Refused
        ceilings.held_calls += 1
        ceilings.held_fed += fed
        ceilings.held_made += made
        ceilings.held_cost += worst
    return ceilings, fed, made, worst, perf_counter()


def _after(state: tuple[Any, ...], result: Any) -> Any:
    ceilings, fed, made, worst, started = state
    seconds = perf_counter() - started
    usage = result.usage
    used_fed, used_made = usage.prompt_tokens, usage.completion_tokens
    cost = used_fed * ceilings.input_rate + used_made * ceilings.output_rate
    # release and charge in one hold of the lock (_failed only releases)
    with ceilings.lock:
        ceilings.held_calls -= 1
        ceilings.held_fed -= fed
        ceilings.held_made -= made
        ceilings.held_cost -= worst
        ceilings.calls += 1
        ceilings.fed += used_fed
        ceilings.made += used_made
        ceilings.cost += cost
        ceilings.seconds += seconds
    return result


def _failed(state: tuple[Any, ...], failure: BaseException) -> None:
    ceilings, fed, made, worst, started = state
    seconds = perf_counter() - started
    with ceilings.lock:
        ceilings.held_calls -= 1
        ceilings.held_fed -= fed
        ceilings.held_made -= made
        ceilings.held_cost -= worst
        ceilings.seconds += seconds


def install(client: Any, original: Any) -> None:
    """Hook ``client.request`` (the instance's, not its class's) around ``original``."""
    stand_in = type("Unhooked", (type(client),), {"request": original})
    hook = hooked(stand_in, "request", Split(_before, _after, _failed), ("options",))
    client.request = types.MethodType(hook, client)
