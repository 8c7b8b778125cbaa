"""Attribution: ``runguard.step`` / ``guard.step`` and the ledger by step, role and model.

Ground truth is the usage the scripted :class:`Reply` objects sent back (and
the model name the answer reported), with dollars from
``genai_prices.calc_price``; what reached the fake provider is checked too.
Concurrent steps get replies keyed by the message they send, so a call
attributed to the wrong step shows up as the wrong numbers in it.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import genai_prices
import pytest

import runguard
from runguard import BudgetExceeded, RunGuard, Usage, propagate, step
from runguard.steps import NO_ROLE, NO_STEP, current_step
from runguard.testing import FakeProvider, Reply, WireRequest

MODEL = "gpt-4o"
MINI = "gpt-4o-mini"


# -- helpers ---------------------------------------------------------------------


def catalogue_price(model: str, provider: str = "openai", **tokens: int) -> float:
    """The price genai-prices itself gives for these tokens (the reference for cost_usd)."""
    usage = genai_prices.Usage(**tokens)
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


def ask(client: Any, model: str = MODEL, content: str = "hi") -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=500
    )


async def aask(client: Any, model: str = MODEL, content: str = "hi") -> Any:
    return await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=500
    )


def expected(*calls: tuple[Reply, str]) -> tuple[int, int, int, float]:
    """(calls, input, output, dollars) for these (reply, priced model) pairs."""
    return (
        len(calls),
        sum(r.input_tokens for r, _ in calls),
        sum(r.output_tokens for r, _ in calls),
        pytest.approx(
            sum(
                catalogue_price(m, input_tokens=r.input_tokens, output_tokens=r.output_tokens)
                for r, m in calls
            )
        ),
    )


def summary(usage: Usage) -> tuple[int, int, int, float]:
    return (usage.calls, usage.input_tokens, usage.output_tokens, usage.cost_usd)


def summaries(table: dict[str, Usage]) -> dict[str, tuple[int, int, int, float]]:
    return {name: summary(usage) for name, usage in table.items()}


def by_content(replies: dict[str, Reply]) -> Any:
    """A responder answering each request with the reply for its message text."""

    def respond(request: WireRequest) -> Reply:
        return replies[request.body["messages"][-1]["content"]]

    return respond


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=Reply(input_tokens=10, output_tokens=5))


@pytest.fixture
def client(fake: FakeProvider) -> Any:
    return fake.openai(max_retries=0)


# -- by step, role and model -------------------------------------------------------------


def test_calls_are_attributed_by_step_role_and_model(fake: FakeProvider, client: Any) -> None:
    r1 = Reply(input_tokens=120, output_tokens=30)
    r2 = Reply(input_tokens=900, output_tokens=45)
    r3 = Reply(input_tokens=250, output_tokens=80)
    r4 = Reply(input_tokens=60, output_tokens=7)
    fake.script(r1, r2, r3, r4)
    with RunGuard() as guard:
        with runguard.step("research", role="researcher"):
            ask(client)
            ask(client, model=MINI)
        with guard.step("write", role="writer"):
            ask(client)
        ask(client)
    assert fake.wire_count == 4
    ledger = guard.ledger
    assert set(ledger.rows) == {
        ("research", "researcher", MODEL),
        ("research", "researcher", MINI),
        ("write", "writer", MODEL),
        (None, None, MODEL),
    }
    assert summaries(ledger.by_step) == {
        "research": expected((r1, MODEL), (r2, MINI)),
        "write": expected((r3, MODEL)),
        NO_STEP: expected((r4, MODEL)),
    }
    assert summaries(ledger.by_role) == {
        "researcher": expected((r1, MODEL), (r2, MINI)),
        "writer": expected((r3, MODEL)),
        NO_ROLE: expected((r4, MODEL)),
    }
    assert summaries(ledger.by_model) == {
        MODEL: expected((r1, MODEL), (r3, MODEL), (r4, MODEL)),
        MINI: expected((r2, MINI)),
    }
    # the rows add up to what the guard spent
    assert summary(guard.usage) == expected((r1, MODEL), (r2, MINI), (r3, MODEL), (r4, MODEL))
    assert sum(u.llm_seconds for u in ledger.by_step.values()) == pytest.approx(
        guard.usage.llm_seconds
    )


def test_tables_are_ordered_most_expensive_first(fake: FakeProvider, client: Any) -> None:
    fake.script(
        Reply(input_tokens=10, output_tokens=1),
        Reply(input_tokens=5000, output_tokens=900),
        Reply(input_tokens=400, output_tokens=60),
    )
    with RunGuard() as guard:
        for name in ("cheap", "dear", "middling"):
            with step(name):
                ask(client)
    assert list(guard.ledger.by_step) == ["dear", "middling", "cheap"]


def test_nested_steps_build_paths_and_inherit_the_role(fake: FakeProvider, client: Any) -> None:
    with RunGuard() as guard:
        assert current_step() == (None, None)
        with step("plan", role="planner"):
            with step("search"):
                assert current_step() == ("plan/search", "planner")
                ask(client)
                with step("deeper", role="crawler"):
                    ask(client)
            with step("draft", role="writer"):
                ask(client)
            ask(client)
        assert current_step() == (None, None)
    assert sorted(guard.ledger.rows, key=str) == sorted(
        [
            ("plan/search", "planner", MODEL),
            ("plan/search/deeper", "crawler", MODEL),
            ("plan/draft", "writer", MODEL),
            ("plan", "planner", MODEL),
        ],
        key=str,
    )
    assert {name: u.calls for name, u in guard.ledger.by_role.items()} == {
        "planner": 2,
        "crawler": 1,
        "writer": 1,
    }


def test_by_model_uses_the_model_the_answer_reports(fake: FakeProvider, client: Any) -> None:
    dated = Reply(input_tokens=400, output_tokens=50, model="gpt-4o-2024-05-13")
    plain = Reply(input_tokens=400, output_tokens=50)
    fake.script(dated, plain)
    with RunGuard() as guard, step("answer"):
        ask(client)
        ask(client)
    assert [r.model for r in fake.requests] == [MODEL, MODEL]
    by_model = summaries(guard.ledger.by_model)
    # the dated model is priced as itself (it costs more than the alias gpt-4o points to)
    assert by_model == {
        "gpt-4o-2024-05-13": expected((dated, "gpt-4o-2024-05-13")),
        MODEL: expected((plain, MODEL)),
    }
    assert by_model["gpt-4o-2024-05-13"][3] != expected((plain, MODEL))[3]
    assert next(iter(guard.ledger.by_model)) == "gpt-4o-2024-05-13"


def test_anthropic_calls_are_attributed_too(fake: FakeProvider) -> None:
    reply = Reply(input_tokens=700, output_tokens=40)
    fake.script(reply)
    model = "claude-3-5-haiku-latest"
    with RunGuard() as guard, step("summarise", role="editor"):
        fake.anthropic(max_retries=0).messages.create(
            model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
    ((key, usage),) = guard.ledger.rows.items()
    assert key[:2] == ("summarise", "editor")
    assert key[2].startswith("claude-3-5-haiku")
    cost = catalogue_price(model, "anthropic", input_tokens=700, output_tokens=40)
    assert summary(usage) == (1, 700, 40, pytest.approx(cost))


def test_a_stream_is_attributed_to_the_step_it_was_opened_in(
    fake: FakeProvider, client: Any
) -> None:
    fake.script(Reply(input_tokens=321, output_tokens=12))
    with RunGuard() as guard:
        with step("opened"):
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        with step("read"):
            for _ in stream:
                pass
    ((key, usage),) = guard.ledger.rows.items()
    assert key == ("opened", None, MODEL)
    assert (usage.input_tokens, usage.output_tokens) == (321, 12)


def test_refused_calls_are_not_in_the_ledger(fake: FakeProvider, client: Any) -> None:
    with RunGuard(max_calls=1, raise_on_exit=False) as guard:
        with step("allowed"):
            ask(client)
        with step("refused"), pytest.raises(BudgetExceeded):
            ask(client)
    assert fake.wire_count == 1
    assert list(guard.ledger.by_step) == ["allowed"]


# -- the most expensive step, plain data and the report ---------------------------------------


def test_most_expensive_step_is_by_dollars_not_tokens(fake: FakeProvider, client: Any) -> None:
    bulk = Reply(input_tokens=6000, output_tokens=1000)  # many cheap tokens
    think = Reply(input_tokens=500, output_tokens=150)  # few dear ones
    fake.script(bulk, think, Reply(input_tokens=3, output_tokens=1))
    with RunGuard(name="agent") as guard:
        with step("bulk", role="reader"):
            ask(client, model=MINI)
        with step("think", role="reasoner"):
            ask(client)
        ask(client)
    costs = {
        "bulk": catalogue_price(MINI, input_tokens=6000, output_tokens=1000),
        "think": catalogue_price(MODEL, input_tokens=500, output_tokens=150),
    }
    top = max(costs, key=lambda name: costs[name])
    assert top == "think"  # the premise: fewer tokens, more dollars
    name, usage = guard.ledger.most_expensive_step  # type: ignore[misc]
    assert name == top
    assert usage.cost_usd == pytest.approx(costs[top])

    report = guard.report()
    for label in ("bulk", "think", NO_STEP, "reader", "reasoner", MODEL, MINI):
        assert label in report
    assert f"most expensive step: think (${costs['think']:.4f})" in report
    assert "RunGuard 'agent': 3 calls" in report


def test_to_dict_is_plain_json(fake: FakeProvider, client: Any) -> None:
    reply = Reply(input_tokens=77, output_tokens=11)
    fake.script(reply, reply)
    with RunGuard() as guard:
        with step("one", role="r"):
            ask(client)
        ask(client, model=MINI)
    data = guard.ledger.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {"by_step", "by_role", "by_model"}
    assert set(data["by_step"]) == {"one", NO_STEP}
    assert set(data["by_role"]) == {"r", NO_ROLE}
    assert data["by_step"]["one"]["input_tokens"] == 77
    assert data["by_model"][MINI]["cost_usd"] == pytest.approx(
        catalogue_price(MINI, input_tokens=77, output_tokens=11)
    )


def test_an_empty_ledger(fake: FakeProvider) -> None:
    with RunGuard() as guard:
        pass
    assert guard.ledger.rows == {}
    assert guard.ledger.most_expensive_step is None
    assert guard.ledger.to_dict() == {"by_step": {}, "by_role": {}, "by_model": {}}
    assert "most expensive step" not in guard.report()


# -- tasks and threads --------------------------------------------------------------------


REPLIES = {
    "alpha": Reply(input_tokens=101, output_tokens=11, delay=0.01),
    "beta": Reply(input_tokens=202, output_tokens=22, delay=0.01),
    "gamma": Reply(input_tokens=303, output_tokens=33, delay=0.01),
}


async def test_tasks_spawned_inside_a_step_are_attributed_to_it() -> None:
    fake = FakeProvider(responder=by_content(REPLIES))
    aclient = fake.async_openai(max_retries=0)
    with RunGuard() as guard:
        async with step("fan-out", role="worker"):
            tasks = [asyncio.create_task(aask(aclient, content="alpha")) for _ in range(4)]
        # the tasks run after the step has ended: they kept its label
        await asyncio.gather(*tasks)
    assert fake.wire_count == 4
    assert summaries(guard.ledger.by_step) == {
        "fan-out": expected(*[(REPLIES["alpha"], MODEL)] * 4)
    }
    assert list(guard.ledger.by_role) == ["worker"]


async def test_steps_in_concurrent_tasks_do_not_mix() -> None:
    fake = FakeProvider(responder=by_content(REPLIES))
    aclient = fake.async_openai(max_retries=0)

    async def worker(name: str) -> None:
        async with step(name, role=f"{name}-role"):
            for _ in range(5):
                await aask(aclient, content=name)
                await asyncio.sleep(0)

    with RunGuard() as guard:
        await asyncio.gather(*(worker(name) for name in REPLIES))
    assert fake.wire_count == 15
    assert summaries(guard.ledger.by_step) == {
        name: expected(*[(reply, MODEL)] * 5) for name, reply in REPLIES.items()
    }
    assert set(guard.ledger.by_role) == {f"{name}-role" for name in REPLIES}


def test_threads_started_with_propagate_keep_the_step() -> None:
    fake = FakeProvider(responder=by_content(REPLIES))
    client = fake.openai(max_retries=0)
    with RunGuard() as guard:
        with step("pool", role="threads"), ThreadPoolExecutor(4) as pool:
            list(pool.map(propagate(lambda _: ask(client, content="beta")), range(8)))
        with ThreadPoolExecutor(2) as pool:
            # a plain thread sees neither the step nor the guard: not counted here
            pool.submit(ask, client, content="gamma").result()
    assert fake.wire_count == 9
    assert summaries(guard.ledger.by_step) == {"pool": expected(*[(REPLIES["beta"], MODEL)] * 8)}
    assert list(guard.ledger.by_role) == ["threads"]


def test_steps_in_concurrent_threads_do_not_mix() -> None:
    fake = FakeProvider(responder=by_content(REPLIES))
    client = fake.openai(max_retries=0)
    barrier = threading.Barrier(len(REPLIES))

    def worker(name: str) -> None:
        barrier.wait(timeout=10)
        with step(name):
            for _ in range(5):
                ask(client, content=name)

    with RunGuard() as guard, ThreadPoolExecutor(len(REPLIES)) as pool:
        for future in [pool.submit(propagate(worker), name) for name in REPLIES]:
            future.result()
    assert fake.wire_count == 15
    assert summaries(guard.ledger.by_step) == {
        name: expected(*[(reply, MODEL)] * 5) for name, reply in REPLIES.items()
    }


# -- nested RunGuards, and memory ---------------------------------------------------------------


def test_nested_runguards_attribute_a_call_to_the_same_step(
    fake: FakeProvider, client: Any
) -> None:
    inside, outside = (
        Reply(input_tokens=55, output_tokens=9),
        Reply(input_tokens=66, output_tokens=3),
    )
    fake.script(inside, inside, outside)
    with RunGuard(name="outer") as outer:
        with step("shared", role="both"), RunGuard(name="inner") as inner:
            ask(client)
            ask(client)
        with step("outer-only"):
            ask(client)
    assert set(inner.ledger.rows) == {("shared", "both", MODEL)}
    assert (
        inner.ledger.rows[("shared", "both", MODEL)] == outer.ledger.rows[("shared", "both", MODEL)]
    )
    assert summaries(inner.ledger.by_step) == {"shared": expected((inside, MODEL), (inside, MODEL))}
    assert summaries(outer.ledger.by_step) == {
        "shared": expected((inside, MODEL), (inside, MODEL)),
        "outer-only": expected((outside, MODEL)),
    }


def test_the_ledger_keeps_one_row_per_step_role_and_model(fake: FakeProvider, client: Any) -> None:
    names = ("retrieve", "rank", "answer")
    with RunGuard() as guard:
        for i in range(2000):
            with step(names[i % 3], role="agent"):
                ask(client)
    assert fake.wire_count == 2000
    assert len(guard.ledger.rows) == 3
    assert {name: u.calls for name, u in guard.ledger.by_step.items()} == {
        "retrieve": 667,
        "rank": 667,
        "answer": 666,
    }
    assert guard.ledger.by_step["rank"].input_tokens == 667 * fake.default.input_tokens


CALL_FIELDS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "llm_seconds",
    "estimated_calls",
    "unpriced_calls",
)


def test_a_row_adds_up_every_field_of_its_calls(fake: FakeProvider, client: Any) -> None:
    # rows are added to in place: each field is checked on a call after the row's first
    unpriced, claude = "acme-house-model-1", "claude-haiku-4-5"  # the first has no price
    fake.script(
        Reply(input_tokens=30, output_tokens=4),
        Reply(usage=False),  # charged its reservation, counted as estimated
        Reply(input_tokens=50, output_tokens=6),
        Reply(input_tokens=1200, cache_read_tokens=1024, output_tokens=7),
        Reply(usage=False),
        Reply(input_tokens=20, output_tokens=3),
        Reply(input_tokens=2100, cache_write_tokens=2000, cache_read_tokens=64, output_tokens=5),
    )
    with RunGuard() as guard, step("work"):
        for model in (MODEL, MODEL, unpriced, MODEL, unpriced):
            ask(client, model)
        for _ in range(2):
            fake.anthropic().messages.create(
                model=claude, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            )
    assert fake.wire_count == 7
    rows = guard.ledger.by_model
    usage = guard.usage
    assert (rows[unpriced].calls, rows[unpriced].unpriced_calls) == (2, 2)
    assert (rows[MODEL].estimated_calls, rows[MODEL].cache_read_tokens) == (1, 1024)
    assert (rows[claude].cache_write_tokens, rows[claude].cache_read_tokens) == (2000, 64)
    for name in CALL_FIELDS:  # every call is in one step, and in one of three model rows
        assert getattr(guard.ledger.by_step["work"], name) == pytest.approx(getattr(usage, name))
        assert sum(getattr(row, name) for row in rows.values()) == pytest.approx(
            getattr(usage, name)
        )
    assert (usage.calls, usage.estimated_calls, usage.unpriced_calls) == (7, 2, 2)
    assert rows[MODEL].llm_seconds > 0


# -- the step object itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("",), "name"),
        ((None,), "name"),
        ((5,), "name"),
        ((b"x",), "name"),
        (("ok", ""), "role"),
        (("ok", 5), "role"),
    ],
)
def test_bad_step_arguments_raise_type_error(args: tuple[Any, ...], field: str) -> None:
    with pytest.raises(TypeError, match=field):
        step(*args)
    with pytest.raises(TypeError, match=field):
        RunGuard().step(*args)


async def test_async_with_step(fake: FakeProvider) -> None:
    aclient = fake.async_openai(max_retries=0)
    with RunGuard() as guard:
        async with guard.step("async-step", role="coroutine") as label:
            assert isinstance(label, step)
            assert current_step() == ("async-step", "coroutine")
            await aask(aclient)
        assert current_step() == (None, None)
    assert list(guard.ledger.rows) == [("async-step", "coroutine", MODEL)]


def test_a_step_ends_even_when_its_body_raises() -> None:
    with pytest.raises(ValueError), step("failing", role="r"):
        assert current_step() == ("failing", "r")
        raise ValueError("boom")
    assert current_step() == (None, None)


def test_a_step_outside_any_runguard_does_nothing(fake: FakeProvider, client: Any) -> None:
    with step("unguarded"):
        ask(client)
    assert fake.wire_count == 1
    with RunGuard() as guard:
        pass
    assert guard.ledger.rows == {}


# -- one step object entered more than once ------------------------------------------------------
# A step is a context manager object like a lock: it is natural to make it once
# (``research = guard.step("research")``) and enter it wherever that work happens.


def test_a_step_object_entered_twice_restores_the_outer_label() -> None:
    # A step object keeps no state: entered inside itself, each exit restores
    # the label it entered from, and nothing leaks once both have exited.
    label = step("x")

    def enter_twice() -> tuple[str | None, str | None]:
        with label:
            with label:
                pass
            assert current_step() == ("x", None)
        return current_step()

    # in a copy of the context, so that a leaked label cannot reach other tests
    assert contextvars.copy_context().run(enter_twice) == (None, None)


async def test_one_step_object_shared_by_concurrent_tasks() -> None:
    # One step object entered by concurrent tasks: each task's label lives in
    # its own context, so exits never cross and nothing raises into the agent.
    fake = FakeProvider(responder=by_content(REPLIES))
    aclient = fake.async_openai(max_retries=0)
    research = step("research", role="researcher")

    async def worker(name: str) -> None:
        async with research:
            await aask(aclient, content=name)

    with RunGuard() as guard:
        await asyncio.gather(*(worker(name) for name in REPLIES))
    assert summaries(guard.ledger.by_step) == {
        "research": expected(*[(reply, MODEL) for reply in REPLIES.values()])
    }
    assert current_step() == (None, None)
