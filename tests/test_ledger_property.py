"""Property: whatever the interleaving, every guard's ledger equals what the wire answered.

Hypothesis draws a sequence of actions: enter or leave a nested guard (1 to 3
deep), make one call, or make a batch of calls from several threads at once.
Calls are plain or streamed, read to the end, abandoned after one event,
dropped unread, or failed with a 500 (no retries). The fake provider answers
each call with the reply drawn for it, and records every request.

The expectation for each guard is computed from the wire: the requests that
were sent while the guard was active, priced with genai-prices. Calls refused
by a ceiling must not appear on the wire, and every reservation is released.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import anthropic
import genai_prices
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runguard import BudgetExceeded, RunGuard, propagate
from runguard.testing import FakeProvider, Reply, WireRequest
from runguard.tokens import count_messages, counter_for

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
KINDS = ["call", "stream", "abandon", "drop", "fail"]


@dataclass(frozen=True)
class Op:
    kind: str
    provider: str
    max_tokens: int
    input_tokens: int
    output_tokens: int
    cache_read: int
    cache_write: int


@st.composite
def ops(draw: st.DrawFn) -> Op:
    provider = draw(st.sampled_from(sorted(MODELS)))
    max_tokens = draw(st.integers(1, 200))
    input_tokens = draw(st.integers(1, 5_000))
    cache_read = draw(st.integers(0, input_tokens))
    cache_write = 0
    if provider == "anthropic":  # OpenAI reports no cache writes
        cache_write = draw(st.integers(0, input_tokens - cache_read))
    return Op(
        kind=draw(st.sampled_from(KINDS)),
        provider=provider,
        max_tokens=max_tokens,
        input_tokens=input_tokens,
        # at least 1: an Anthropic stream's message_start already reports one
        output_tokens=draw(st.integers(1, max_tokens)),
        cache_read=cache_read,
        cache_write=cache_write,
    )


actions = st.lists(
    st.one_of(
        st.just(("enter",)),
        st.just(("exit",)),
        st.tuples(st.just("call"), ops()),
        st.tuples(st.just("batch"), st.lists(ops(), min_size=2, max_size=4)),
    ),
    min_size=1,
    max_size=14,
)


# -- the fake provider: answers each call with its own drawn reply ----------------------------

_ids = itertools.count(1)
_lock = threading.Lock()
_pending: dict[int, Op] = {}


def _op_id(wire: WireRequest) -> int:
    content = wire.body["messages"][0]["content"]
    return int(content.split("-")[1])


def _respond(wire: WireRequest) -> Reply:
    with _lock:
        op = _pending[_op_id(wire)]
    return Reply(
        text="one two three four",
        input_tokens=op.input_tokens,
        output_tokens=op.output_tokens,
        cache_read_tokens=op.cache_read,
        cache_write_tokens=op.cache_write,
        status=500 if op.kind == "fail" else 200,
        chunks=3,
    )


FAKE = FakeProvider(responder=_respond)
CLIENTS = {
    "openai": FAKE.openai(max_retries=0),
    "anthropic": FAKE.anthropic(max_retries=0),
}
API_ERRORS = (openai.APIStatusError, anthropic.APIStatusError)


def run_op(op_id: int, op: Op) -> str:
    """Make the call; 'sent', 'refused' or 'failed'."""
    client = CLIENTS[op.provider]
    kwargs: dict[str, Any] = {
        "model": MODELS[op.provider],
        "messages": [{"role": "user", "content": f"op-{op_id}"}],
        "max_tokens": op.max_tokens,
    }
    create = client.chat.completions.create if op.provider == "openai" else client.messages.create
    try:
        if op.kind in ("call", "fail"):
            create(**kwargs)
        else:
            stream = create(stream=True, **kwargs)
            if op.kind == "stream":
                for _ in stream:
                    pass
            elif op.kind == "abandon":
                next(iter(stream))
                stream.close()
            del stream  # "drop": never read, never closed
    except BudgetExceeded:
        return "refused"
    except API_ERRORS:
        return "failed"
    return "sent"


# -- what the wire says each guard should have been charged ---------------------------------


@lru_cache(maxsize=4096)
def price(provider: str, inp: int, out: int, read: int, write: int) -> float:
    usage = genai_prices.Usage(
        input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write
    )
    return float(genai_prices.calc_price(usage, MODELS[provider], provider_id=provider).total_price)


def expected_usage(op: Op, wire: WireRequest) -> tuple[int, int, int, int, int, float, int]:
    """(calls, input, output, cache_read, cache_write, cost, estimated) for one sent request."""
    if op.kind == "fail":
        return (1, 0, 0, 0, 0, 0.0, 0)
    if op.kind in ("call", "stream"):
        usage = (op.input_tokens, op.output_tokens, op.cache_read, op.cache_write)
        return (1, *usage, price(op.provider, *usage), 0)
    # Usage never fully arrived: the worst case reserved for what is missing.
    # An abandoned Anthropic stream has read message_start, which carries the input.
    if op.kind == "abandon" and op.provider == "anthropic":
        usage = (op.input_tokens, op.max_tokens, op.cache_read, op.cache_write)
    else:
        model = wire.body["model"]
        estimate = count_messages(wire.body["messages"], counter_for(op.provider, model))
        usage = (estimate, op.max_tokens, 0, 0)
    return (1, *usage, price(op.provider, *usage), 1)


def check(guards: list[tuple[RunGuard, set[int]]], plan: dict[int, Op], outcome: dict[int, str]):
    wire_ids = [_op_id(w) for w in FAKE.requests]
    assert len(wire_ids) == len(set(wire_ids)), "a call reached the wire twice"
    assert set(wire_ids) == {i for i, o in outcome.items() if o != "refused"}
    by_id = {_op_id(w): w for w in FAKE.requests}
    for guard, covered in guards:
        rows = [expected_usage(plan[i], by_id[i]) for i in covered if i in by_id]
        usage = guard.usage
        totals = [sum(col) for col in zip(*rows, strict=True)] if rows else [0] * 7
        assert usage.calls == totals[0] == len(rows)
        assert usage.input_tokens == totals[1]
        assert usage.output_tokens == totals[2]
        assert usage.cache_read_tokens == totals[3]
        assert usage.cache_write_tokens == totals[4]
        assert usage.cost_usd == pytest.approx(totals[5], rel=1e-9, abs=1e-12)
        assert usage.estimated_calls == totals[6]
        account = guard._account
        assert account.reserved_calls == 0
        assert account.reserved_input_tokens == 0
        assert account.reserved_output_tokens == 0
        assert account.reserved_cost_usd == 0
        limit = next((g.limit for g in guard.guards if g.name == "max_calls"), None)
        if limit is not None:
            assert usage.calls <= limit


def test_ledger_matches_the_wire() -> None:
    # Objects alive now are frozen out of the collector, so the gc.collect()
    # that settles dropped streams in every example stays cheap.
    gc.collect()
    gc.freeze()
    try:
        ledger_matches_the_wire()
    finally:
        gc.unfreeze()


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=actions, data=st.data())
def ledger_matches_the_wire(steps, data: st.DataObject) -> None:
    FAKE.reset()
    plan: dict[int, Op] = {}
    outcome: dict[int, str] = {}
    stack: list[tuple[RunGuard, set[int]]] = []
    everyone: list[tuple[RunGuard, set[int]]] = []

    def enter() -> None:
        limit = data.draw(st.one_of(st.none(), st.integers(1, 8)), label="max_calls")
        guard = RunGuard(
            max_calls=limit,
            max_cost_usd=1_000.0,
            max_total_tokens=10**9,
            raise_on_exit=False,
            name=f"g{len(everyone)}",
        )
        guard.__enter__()
        stack.append((guard, set()))
        everyone.append(stack[-1])

    def start(op: Op) -> int:
        op_id = next(_ids)
        with _lock:
            _pending[op_id] = op
        plan[op_id] = op
        for _, covered in stack:
            covered.add(op_id)
        return op_id

    enter()
    try:
        for step in steps:
            if step[0] == "enter" and len(stack) < 3:
                enter()
            elif step[0] == "exit" and len(stack) > 1:
                guard, _ = stack.pop()
                guard.__exit__(None, None, None)
            elif step[0] == "call":
                op_id = start(step[1])
                outcome[op_id] = run_op(op_id, step[1])
            elif step[0] == "batch":
                batch = [(start(op), op) for op in step[1]]
                with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                    futures = [pool.submit(propagate(run_op), i, op) for i, op in batch]
                    for (op_id, _), future in zip(batch, futures, strict=True):
                        outcome[op_id] = future.result()
    finally:
        while stack:
            guard, _ = stack.pop()
            guard.__exit__(None, None, None)
    gc.collect()  # dropped streams settle when collected
    check(everyone, plan, outcome)
    with _lock:
        for op_id in plan:
            _pending.pop(op_id, None)


# -- closing a stream settles it, without waiting for the garbage collector --------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("how", ["close", "with"])
def test_closing_a_stream_settles_it(provider: str, how: str) -> None:
    fake = FakeProvider(default=Reply(input_tokens=40, output_tokens=7, chunks=4))
    gc.disable()  # the point is not to need it
    try:
        with RunGuard() as guard:
            if provider == "openai":
                create = fake.openai(max_retries=0).chat.completions.create
            else:
                create = fake.anthropic(max_retries=0).messages.create
            stream = create(
                model=MODELS[provider],
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=33,
                stream=True,
            )
            if how == "close":
                next(iter(stream))
                stream.close()
            else:
                with stream:
                    next(iter(stream))
            kept = stream  # alive: only the close can have settled it
            assert guard._account.reserved_calls == 0, "a closed stream is still reserved"
            assert guard.usage.calls == 1
        assert kept is stream
    finally:
        gc.enable()
    assert fake.wire_count == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_closing_an_async_stream_settles_it(provider: str) -> None:
    fake = FakeProvider(default=Reply(input_tokens=40, output_tokens=7, chunks=4))
    gc.disable()
    try:
        async with RunGuard() as guard:
            if provider == "openai":
                create = fake.async_openai(max_retries=0).chat.completions.create
            else:
                create = fake.async_anthropic(max_retries=0).messages.create
            stream = await create(
                model=MODELS[provider],
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=33,
                stream=True,
            )
            await stream.__aiter__().__anext__()
            await stream.close()
            await asyncio.sleep(0)
            assert guard._account.reserved_calls == 0, "a closed stream is still reserved"
            assert guard.usage.calls == 1
    finally:
        gc.enable()
    assert fake.wire_count == 1
