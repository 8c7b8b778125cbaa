"""RunGuard's lifecycle: nesting, latching, raise_on_exit, scope, @guarded, custom guards.

Ground truth is always what reached the fake provider (``fake.wire_count`` and
``fake.requests``), compared with what each guard says it spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import runguard
from _sdk import has
from runguard import (
    BudgetExceeded,
    GuardTripped,
    RunGuard,
    Trip,
    UnknownModelPrice,
    current_guard,
    guarded,
    propagate,
)
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hi"}]


def ask(client, model: str = MODEL, max_tokens: int = 16, content: str = "hi"):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
    )


async def aask(client, model: str = MODEL, max_tokens: int = 16, content: str = "hi"):
    return await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
    )


def try_ask(client, **kwargs) -> bool:
    """One call; True if it was sent, False if a guard refused it."""
    try:
        ask(client, **kwargs)
    except BudgetExceeded:
        return False
    return True


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=Reply(input_tokens=7, output_tokens=3))


@pytest.fixture
def client(fake: FakeProvider):
    return fake.openai(max_retries=0)


@pytest.fixture
def aclient(fake: FakeProvider):
    return fake.async_openai(max_retries=0)


def test_exception_hierarchy() -> None:
    assert issubclass(BudgetExceeded, GuardTripped)
    assert issubclass(GuardTripped, runguard.RunGuardError)


# -- nesting ----------------------------------------------------------------------------


def test_inner_trips_while_outer_is_fine(fake: FakeProvider, client) -> None:
    with RunGuard(max_calls=10, name="outer") as outer:
        with pytest.raises(BudgetExceeded) as info, RunGuard(max_calls=2, name="inner") as inner:
            for _ in range(5):
                ask(client)
        assert info.value.trip is inner.trip
        assert info.value.trip.run == "inner"
        assert info.value.trip.guard == "max_calls"
        assert info.value.trip.limit == 2
        assert "inner" in str(info.value)
        assert fake.wire_count == 2
        assert inner.usage.calls == 2
        assert outer.usage.calls == 2
        assert not outer.tripped

        # the outer guard still admits calls once the inner one is gone
        ask(client)
        assert fake.wire_count == 3
        assert outer.usage.calls == 3
        assert inner.usage.calls == 2
        assert outer.usage.input_tokens == 3 * 7
        assert outer.usage.output_tokens == 3 * 3
        assert inner.usage.input_tokens == 2 * 7
    assert outer.trip is None


def test_outer_refusal_is_reported_with_the_outer_name(fake: FakeProvider, client) -> None:
    with (
        pytest.raises(BudgetExceeded) as info,
        RunGuard(max_calls=2, name="outer") as outer,
        RunGuard(max_calls=10, name="inner") as inner,
    ):
        ask(client)
        ask(client)
        ask(client)  # refused by the outer guard
    assert info.value.trip is outer.trip
    assert info.value.trip.run == "outer"
    assert "outer" in str(info.value)
    assert not inner.tripped
    assert fake.wire_count == 2
    assert outer.usage.calls == inner.usage.calls == 2
    # the refused call reserved nothing in the inner guard that would have admitted it
    assert inner._account.reserved_calls == 0
    assert inner._account.reserved_output_tokens == 0
    assert info.value.usage.calls == 2


def test_outer_latch_refuses_inside_a_fresh_inner_guard(fake: FakeProvider, client) -> None:
    with RunGuard(max_calls=1, name="outer", raise_on_exit=False) as outer:
        ask(client)
        assert not try_ask(client)
        with pytest.raises(BudgetExceeded) as info, RunGuard(max_calls=50, name="inner"):
            ask(client)
        assert info.value.trip.run == "outer"
    assert fake.wire_count == 1
    assert outer.usage.calls == 1


def test_every_nested_guard_is_charged_what_the_wire_answered(fake: FakeProvider, client) -> None:
    fake.script(
        Reply(input_tokens=11, output_tokens=2),
        Reply(input_tokens=13, output_tokens=4),
        Reply(input_tokens=17, output_tokens=6),
    )
    with RunGuard(name="a") as a:
        ask(client)
        with RunGuard(name="b") as b:
            ask(client)
            with RunGuard(name="c") as c:
                ask(client)
    assert fake.wire_count == 3
    assert (a.usage.calls, a.usage.input_tokens, a.usage.output_tokens) == (3, 41, 12)
    assert (b.usage.calls, b.usage.input_tokens, b.usage.output_tokens) == (2, 30, 10)
    assert (c.usage.calls, c.usage.input_tokens, c.usage.output_tokens) == (1, 17, 6)


# -- latch ------------------------------------------------------------------------------


async def test_after_a_trip_every_kind_of_call_is_refused(fake: FakeProvider, client, aclient):
    anthropic_client = fake.anthropic(max_retries=0)
    async_anthropic = fake.async_anthropic(max_retries=0)
    with RunGuard(max_output_tokens=100, raise_on_exit=False) as guard:
        ask(client, max_tokens=10)
        # this one alone would cross the ceiling: refused, and the guard latches
        with pytest.raises(BudgetExceeded):
            ask(client, max_tokens=200)
        sent = fake.wire_count
        assert sent == 1
        # every later call is refused at once, even ones that would fit
        with pytest.raises(BudgetExceeded):
            ask(client, max_tokens=1)
        with pytest.raises(BudgetExceeded):
            await aask(aclient, max_tokens=1)
        with pytest.raises(BudgetExceeded):
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=1, stream=True
            )
        with pytest.raises(BudgetExceeded):
            await aclient.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=1, stream=True
            )
        if has(client, "responses"):  # only the calls this SDK can make
            with pytest.raises(BudgetExceeded):
                client.responses.create(model=MODEL, input="hi", max_output_tokens=1)
        with pytest.raises(BudgetExceeded):
            anthropic_client.messages.create(
                model="claude-haiku-4-5", max_tokens=1, messages=MESSAGES
            )
        with (
            pytest.raises(BudgetExceeded),
            anthropic_client.messages.stream(
                model="claude-haiku-4-5", max_tokens=1, messages=MESSAGES
            ) as stream,
        ):
            stream.get_final_message()
        with pytest.raises(BudgetExceeded):
            await async_anthropic.messages.create(
                model="claude-haiku-4-5", max_tokens=1, messages=MESSAGES, stream=True
            )
        assert fake.wire_count == sent
    assert guard.trip is not None
    assert guard.trip.guard == "max_output_tokens"
    assert guard.usage.calls == 1
    assert guard._account.reserved_calls == 0


def test_refusals_carry_the_same_latched_trip(client) -> None:
    with RunGuard(max_calls=1, raise_on_exit=False) as guard:
        ask(client)
        trips = []
        for _ in range(3):
            with pytest.raises(BudgetExceeded) as info:
                ask(client)
            trips.append(info.value.trip)
    assert all(t is guard.trip for t in trips)


# -- raise_on_exit ----------------------------------------------------------------------


def test_exit_reraises_a_trip_the_agent_swallowed(fake: FakeProvider, client) -> None:
    reached_end = False
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_calls=2, name="agent") as guard:
        for _ in range(5):
            with contextlib.suppress(BudgetExceeded):  # a careless agent
                ask(client)
        reached_end = True
    assert reached_end
    assert info.value.trip is guard.trip
    assert info.value.trip.run == "agent"
    assert info.value.usage.calls == 2
    assert fake.wire_count == 2


async def test_async_exit_reraises_a_swallowed_trip(fake: FakeProvider, aclient) -> None:
    with pytest.raises(BudgetExceeded):
        async with RunGuard(max_calls=1):
            await aask(aclient)
            with contextlib.suppress(BudgetExceeded):
                await aask(aclient)
    assert fake.wire_count == 1


def test_raise_on_exit_false_ends_quietly(fake: FakeProvider, client) -> None:
    with RunGuard(max_calls=2, raise_on_exit=False) as swallowed:
        for _ in range(4):
            try_ask(client)
    assert swallowed.tripped
    assert swallowed.trip is not None and swallowed.trip.guard == "max_calls"

    after = []
    with RunGuard(max_calls=1, raise_on_exit=False) as propagated:
        ask(client)
        ask(client)  # refused: the exception ends the block, quietly
        after.append("not reached")
    assert after == []
    assert propagated.tripped
    assert fake.wire_count == 3


def test_exit_does_not_raise_when_never_tripped(fake: FakeProvider, client) -> None:
    with RunGuard(max_calls=3, max_total_tokens=10_000, max_cost_usd=1.0) as guard:
        for _ in range(3):
            ask(client)
    assert guard.trip is None
    assert not guard.tripped
    assert guard.usage.calls == 3 == fake.wire_count


def test_exit_raises_when_usage_overshot_after_the_last_call(fake: FakeProvider, client) -> None:
    # the input estimate of "hi" is tiny; the provider reports far more input
    fake.script(Reply(input_tokens=500, output_tokens=1))
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_input_tokens=100) as guard:
        ask(client)  # admitted, then settled over the ceiling: latched
        with pytest.raises(BudgetExceeded):
            ask(client)  # the next call is refused
    assert fake.wire_count == 1
    assert info.value.trip is guard.trip
    assert guard.trip.observed == 500
    assert guard.usage.input_tokens == 500


def test_refusals_survive_a_trip_through_pickle(client) -> None:
    # as from a process pool's worker back to its parent
    refusals: list[Exception] = []
    with RunGuard(max_calls=1, max_cost_usd=1.0, raise_on_exit=False):
        ask(client)
        for model in (MODEL, "my-private-finetune"):
            try:
                ask(client, model=model)
            except (BudgetExceeded, UnknownModelPrice) as refused:
                refusals.append(refused)
    assert [type(e) for e in refusals] == [BudgetExceeded, UnknownModelPrice]
    for refused in refusals:
        back = pickle.loads(pickle.dumps(refused))
        assert type(back) is type(refused)
        assert str(back) == str(refused)
        assert vars(back) == vars(refused)


def test_other_exceptions_are_not_replaced_by_the_trip(client) -> None:
    with pytest.raises(KeyError), RunGuard(max_calls=1):
        ask(client)
        try_ask(client)
        raise KeyError("agent bug")


def test_a_runguard_cannot_be_entered_twice(client) -> None:
    guard = RunGuard(max_calls=1)
    with guard:
        with pytest.raises(RuntimeError), guard:
            pass
        assert current_guard() is guard
    with pytest.raises(RuntimeError), guard:
        pass
    assert current_guard() is None


async def test_a_runguard_cannot_be_entered_twice_async() -> None:
    guard = RunGuard()
    async with guard:
        pass
    with pytest.raises(RuntimeError):
        async with guard:
            pass


# -- scope ------------------------------------------------------------------------------


def test_context_scope_does_not_cover_a_plain_thread(fake: FakeProvider, client) -> None:
    seen: dict[str, object] = {}

    def work() -> None:
        seen["guard"] = current_guard()
        sent = 0
        for _ in range(5):
            ask(client)
            sent += 1
        seen["sent"] = sent

    with RunGuard(max_calls=2, raise_on_exit=False) as guard:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        assert seen == {"guard": None, "sent": 5}
        assert fake.wire_count == 5
        assert guard.usage.calls == 0
        ask(client)  # the guard itself is untouched by the thread's calls
    assert guard.usage.calls == 1
    assert not guard.tripped
    assert fake.wire_count == 6


def test_propagate_covers_a_thread_pool_exactly(fake: FakeProvider, client) -> None:
    fake.default = Reply(input_tokens=7, output_tokens=3, delay=0.002)

    def work(_: int) -> tuple[bool, RunGuard | None]:
        return try_ask(client), current_guard()

    with (
        RunGuard(max_calls=6, raise_on_exit=False) as guard,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        results = list(pool.map(propagate(work), range(10)))
    sent = [ok for ok, _ in results]
    assert sent.count(True) == 6
    assert sent.count(False) == 4
    assert all(g is guard for _, g in results)
    assert fake.wire_count == 6
    assert guard.usage.calls == 6
    assert guard.usage.input_tokens == 6 * 7


def test_propagate_keeps_nested_guards(fake: FakeProvider, client) -> None:
    def work(_: int) -> RunGuard | None:
        ask(client)
        return current_guard()

    with (
        RunGuard(name="outer") as outer,
        RunGuard(name="inner") as inner,
        ThreadPoolExecutor(max_workers=3) as pool,
    ):
        names = list(pool.map(propagate(work), range(3)))
    assert names == [inner, inner, inner]
    assert outer.usage.calls == inner.usage.calls == 3 == fake.wire_count


def test_process_scope_covers_a_thread_pool_without_propagate(fake: FakeProvider, client):
    fake.default = Reply(input_tokens=7, output_tokens=3, delay=0.002)

    def work(_: int) -> tuple[bool, RunGuard | None]:
        return try_ask(client), current_guard()

    with (
        RunGuard(max_calls=6, scope="process", raise_on_exit=False) as guard,
        ThreadPoolExecutor(max_workers=4) as pool,
    ):
        results = list(pool.map(work, range(10)))
    sent = [ok for ok, _ in results]
    assert sent.count(True) == 6
    assert all(g is guard for _, g in results)
    assert fake.wire_count == 6
    assert guard.usage.calls == 6

    # once left, the process guard covers nothing any more
    with ThreadPoolExecutor(max_workers=2) as pool:
        after = list(pool.map(work, range(2)))
    assert after == [(True, None), (True, None)]
    assert fake.wire_count == 8
    assert guard.usage.calls == 6


async def test_concurrent_tasks_with_their_own_guards_are_isolated(fake: FakeProvider, aclient):
    tokens = {"alpha": 11, "beta": 23}
    fake.responder = lambda wire: Reply(
        input_tokens=tokens[wire.body["messages"][0]["content"]], output_tokens=1, delay=0.001
    )

    async def agent(tag: str, limit: int, attempts: int) -> tuple[RunGuard, int]:
        sent = 0
        async with RunGuard(max_calls=limit, name=tag, raise_on_exit=False) as guard:
            for _ in range(attempts):
                assert current_guard() is guard
                try:
                    await aask(aclient, content=tag)
                    sent += 1
                except BudgetExceeded:
                    pass
                await asyncio.sleep(0)
        return guard, sent

    (alpha, alpha_sent), (beta, beta_sent) = await asyncio.gather(
        agent("alpha", 3, 6), agent("beta", 10, 5)
    )
    wire = [r.body["messages"][0]["content"] for r in fake.requests]
    assert wire.count("alpha") == alpha_sent == 3
    assert wire.count("beta") == beta_sent == 5
    assert alpha.usage.calls == 3 and alpha.usage.input_tokens == 3 * 11
    assert beta.usage.calls == 5 and beta.usage.input_tokens == 5 * 23
    assert alpha.tripped and not beta.tripped


async def test_tasks_spawned_inside_a_guard_are_covered(fake: FakeProvider, aclient) -> None:
    fake.default = Reply(input_tokens=7, output_tokens=3, delay=0.002)
    async with RunGuard(max_calls=3, raise_on_exit=False) as guard:
        tasks = [asyncio.create_task(aask(aclient)) for _ in range(5)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(refused) == 2
    assert len(results) - len(refused) == 3
    assert fake.wire_count == 3
    assert guard.usage.calls == 3


# -- current_guard ----------------------------------------------------------------------


def test_current_guard_is_the_innermost_or_none() -> None:
    assert current_guard() is None
    with RunGuard(name="a") as a:
        assert current_guard() is a
        with RunGuard(name="b") as b:
            assert current_guard() is b
            with RunGuard(name="c", scope="process") as c:
                assert current_guard() is c
            assert current_guard() is b
        assert current_guard() is a
    assert current_guard() is None


def test_current_guard_follows_entry_order_across_scopes() -> None:
    # Built in one order, entered in the other: "innermost" is about entry.
    inner = RunGuard(name="inner")
    outer = RunGuard(name="outer", scope="process")
    with outer:
        with inner:
            assert current_guard() is inner
        assert current_guard() is outer
    assert current_guard() is None


def test_guards_exited_out_of_order_take_only_themselves_away(fake: FakeProvider, client) -> None:
    # Entered outer then inner, exited outer first (as closing two generators that each
    # hold a guard open can do): the inner guard still covers, the outer one is gone.
    outer = RunGuard(max_calls=1, raise_on_exit=False, name="outer")
    inner = RunGuard(max_calls=2, raise_on_exit=False, name="inner")
    outer.__enter__()
    inner.__enter__()
    ask(client)  # charged to both; the outer guard is full
    outer.__exit__(None, None, None)
    assert current_guard() is inner
    ask(client)  # the outer guard has ended: only the inner one judges
    with pytest.raises(BudgetExceeded) as refused:
        ask(client)
    assert refused.value.trip.run == "inner"
    inner.__exit__(None, None, None)
    assert current_guard() is None
    ask(client)  # outside every guard
    assert fake.wire_count == 3
    assert (outer.usage.calls, inner.usage.calls) == (1, 2)


def test_current_guard_in_another_thread_sees_only_process_guards() -> None:
    found = []
    with RunGuard(name="process", scope="process") as proc, RunGuard(name="context"):
        thread = threading.Thread(target=lambda: found.append(current_guard()))
        thread.start()
        thread.join()
    assert found == [proc]


# -- @guarded ---------------------------------------------------------------------------


def test_guarded_sync_makes_a_fresh_guard_per_invocation(fake: FakeProvider, client) -> None:
    @guarded(max_calls=2, raise_on_exit=False, name="agent")
    def agent(attempts: int) -> tuple[int, RunGuard | None]:
        return sum(try_ask(client) for _ in range(attempts)), current_guard()

    first_sent, first = agent(5)
    second_sent, second = agent(5)
    assert first_sent == second_sent == 2
    assert first is not None and second is not None and first is not second
    assert first.name == "agent"
    assert first.usage.calls == second.usage.calls == 2
    assert fake.wire_count == 4
    assert current_guard() is None
    assert agent.__name__ == "agent"


def test_guarded_sync_raises_each_invocations_trip(fake: FakeProvider, client) -> None:
    @guarded(max_calls=1)
    def agent() -> str:
        ask(client)
        ask(client)
        return "done"

    for _ in range(2):
        with pytest.raises(BudgetExceeded):
            agent()
    assert fake.wire_count == 2


def test_guarded_keeps_guards_given_as_a_generator_for_every_invocation(
    fake: FakeProvider, client
) -> None:
    from runguard.guards import Ceiling

    @guarded(guards=(Ceiling("calls", "calls", n) for n in [1]))
    def agent() -> None:
        ask(client)
        ask(client)

    for _ in range(3):
        with pytest.raises(BudgetExceeded):
            agent()
    assert fake.wire_count == 3  # one call per invocation, each refused at the second


def test_guarded_keeps_budgets_given_as_a_generator_for_every_invocation(
    fake: FakeProvider, client
) -> None:
    # one budget of 2 calls, shared by every invocation (its default store is in memory)
    @guarded(budgets=(runguard.Budget(name, max_calls=2) for name in ["shared-by-invocations"]))
    def agent() -> None:
        ask(client)

    agent()
    agent()
    with pytest.raises(BudgetExceeded):
        agent()
    assert fake.wire_count == 2


def test_guarded_refuses_generator_functions_at_decoration_time(fake: FakeProvider, client):
    # their bodies run while the caller iterates, after the guard would have ended
    with pytest.raises(TypeError, match="generator function"):

        @guarded(max_calls=1)
        def steps():  # type: ignore[no-untyped-def]
            yield ask(client)

    with pytest.raises(TypeError, match="generator function"):

        @guarded(max_calls=1)
        async def asteps():  # type: ignore[no-untyped-def]
            yield await aask(client)

    assert fake.wire_count == 0


async def test_guarded_guards_an_object_with_an_async_call(fake: FakeProvider, aclient) -> None:
    class Agent:
        async def __call__(self) -> RunGuard | None:
            await aask(aclient)
            await aask(aclient)
            return current_guard()

    agent = guarded(max_calls=1)(Agent())
    with pytest.raises(BudgetExceeded):
        await agent()
    assert fake.wire_count == 1
    guard = await guarded(max_calls=5)(Agent())()
    assert guard is not None and guard.usage.calls == 2


def test_guarded_without_arguments(client) -> None:
    @guarded
    def agent() -> RunGuard | None:
        ask(client)
        return current_guard()

    guard = agent()
    assert isinstance(guard, RunGuard)
    assert guard.usage.calls == 1
    assert agent() is not guard


async def test_guarded_async_makes_a_fresh_guard_per_invocation(fake: FakeProvider, aclient):
    @guarded(max_calls=2, raise_on_exit=False)
    async def agent(attempts: int) -> tuple[int, RunGuard | None]:
        sent = 0
        for _ in range(attempts):
            try:
                await aask(aclient)
                sent += 1
            except BudgetExceeded:
                pass
        return sent, current_guard()

    assert inspect.iscoroutinefunction(agent)
    first_sent, first = await agent(4)
    second_sent, second = await agent(4)
    assert first_sent == second_sent == 2
    assert first is not second
    assert fake.wire_count == 4

    # concurrent invocations do not share a guard either
    results = await asyncio.gather(agent(3), agent(3), agent(3))
    assert [sent for sent, _ in results] == [2, 2, 2]
    assert len({id(g) for _, g in results}) == 3
    assert fake.wire_count == 10


@pytest.mark.skipif(not hasattr(asyncio, "TaskGroup"), reason="asyncio.TaskGroup: Python 3.11+")
async def test_a_task_groups_refusals_end_the_block_quietly_when_asked(
    fake: FakeProvider, aclient
) -> None:
    with RunGuard(max_calls=2, raise_on_exit=False) as quiet:
        await aask(aclient)
        await aask(aclient)
        async with asyncio.TaskGroup() as group:  # every task refused: a group of trips
            for _ in range(3):
                group.create_task(aask(aclient))
    assert quiet.trip is not None and fake.wire_count == 2
    # a group that holds another error too goes on
    with (
        pytest.raises(BaseExceptionGroup) as raised,  # noqa: F821 (3.11+)
        RunGuard(max_calls=1, raise_on_exit=False),
    ):
        async with asyncio.TaskGroup() as group:
            group.create_task(aask(aclient))
            group.create_task(aask(aclient))
            raise ValueError("the agent's own error")
    assert raised.value.subgroup(ValueError) is not None


async def test_guarded_async_reraises_a_swallowed_trip(fake: FakeProvider, aclient) -> None:
    @guarded(max_calls=1)
    async def agent() -> None:
        await aask(aclient)
        with contextlib.suppress(BudgetExceeded):
            await aask(aclient)

    with pytest.raises(BudgetExceeded):
        await agent()
    assert fake.wire_count == 1


def test_guarded_validates_settings_at_decoration_time() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        guarded(max_calls=0)
    with pytest.raises(TypeError, match="max_cost_usd"):
        guarded(max_cost_usd="1")
    with pytest.raises(ValueError, match="scope"):
        guarded(scope="thread")


# -- custom guards ----------------------------------------------------------------------


class RefuseModel:
    """Refuses every call to one model."""

    needs_price = False

    def __init__(self, model: str) -> None:
        self.name = f"refuse_{model}"
        self.model = model
        self.admitted: list[runguard.CallRequest] = []
        self.settled_usage: list[runguard.Usage] = []

    def admit(self, request, account):
        if request.model == self.model:
            return Trip(
                guard=self.name,
                reason=f"calls to {self.model} are not allowed",
                limit=0,
                observed=1,
            )
        self.admitted.append(request)
        return None

    def settled(self, request, result, account):
        self.settled_usage.append(result.usage)
        return None


def test_custom_guard_is_consulted(fake: FakeProvider, client) -> None:
    rule = RefuseModel("gpt-4o")
    with RunGuard(guards=[rule], name="custom", raise_on_exit=False) as guard:
        ask(client, model="gpt-4o-mini")
        with pytest.raises(GuardTripped) as info:
            ask(client, model="gpt-4o")
        # latched: even the allowed model is refused now
        with pytest.raises(GuardTripped):
            ask(client, model="gpt-4o-mini")
    assert [r.model for r in fake.requests] == ["gpt-4o-mini"]
    assert info.value.trip.guard == "refuse_gpt-4o"
    assert info.value.trip.run == "custom"
    assert guard.trip is info.value.trip
    assert guard.guards == (rule,)
    assert [(r.provider, r.endpoint, r.model, r.max_output_tokens) for r in rule.admitted] == [
        ("openai", "chat.completions", "gpt-4o-mini", 16)
    ]
    assert [(u.calls, u.input_tokens, u.output_tokens) for u in rule.settled_usage] == [(1, 7, 3)]


class LatchAfterOutput:
    """Latches the run once one call produced more than ``limit`` output tokens."""

    name = "big_output"
    needs_price = False

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def admit(self, request, account):
        return None

    def settled(self, request, result, account):
        output = result.usage.output_tokens
        if output > self.limit:
            return Trip(self.name, "one answer was too long", self.limit, output)
        return None


def test_custom_guard_settled_latches_the_next_call(fake: FakeProvider, client) -> None:
    fake.script(Reply(output_tokens=5), Reply(output_tokens=50))
    with pytest.raises(GuardTripped) as info, RunGuard(guards=[LatchAfterOutput(10)]) as guard:
        ask(client)
        ask(client)  # admitted; its usage trips the custom guard
        assert guard.tripped
        ask(client)
    assert fake.wire_count == 2
    assert info.value.trip.guard == "big_output"
    assert info.value.trip.observed == 50


def test_custom_guard_alongside_a_ceiling(fake: FakeProvider, client) -> None:
    with RunGuard(max_calls=2, guards=[RefuseModel("gpt-4o")], raise_on_exit=False) as guard:
        ask(client)
        ask(client)
        with pytest.raises(BudgetExceeded):
            ask(client)
    assert [g.name for g in guard.guards] == ["max_calls", "refuse_gpt-4o"]
    assert fake.wire_count == 2


class FailsOnceWhenAdmitted:
    """A user's guard with a bug: its ``admitted`` raises the first time."""

    name = "fails_once"
    needs_price = False

    def __init__(self) -> None:
        self.failed = False

    def admit(self, request, account):
        return None

    def settled(self, request, result, account):
        return None

    def admitted(self, request, account):
        if not self.failed:
            self.failed = True
            raise ZeroDivisionError("a bug in the user's guard")


def test_a_guard_whose_admitted_fails_leaves_nothing_of_the_call(fake: FakeProvider, client):
    # The inner guard is told of a call first, the outer one's failing guard after it:
    # the call is not sent, holds nothing, and the inner guard does not count it.
    with RunGuard(max_calls=3, guards=[FailsOnceWhenAdmitted()], raise_on_exit=False) as outer:
        with RunGuard(max_identical_requests=2):
            with pytest.raises(ZeroDivisionError):
                ask(client)
            ask(client)
            ask(client)  # the second copy sent: the failed one was never a copy
        ask(client, content="other")  # the third of max_calls=3: nothing is held
        with pytest.raises(BudgetExceeded):
            ask(client, content="another")
    assert fake.wire_count == 3
    assert outer.usage.calls == 3


class FailsWhenSettled:
    """A user's guard with a bug: its ``settled`` raises."""

    name = "fails_settled"
    needs_price = False

    def admit(self, request, account):
        return None

    def settled(self, request, result, account):
        raise ZeroDivisionError("a bug in the user's guard")


def test_a_guard_whose_settled_fails_takes_neither_the_answer_nor_the_charges(
    fake: FakeProvider, client
) -> None:
    # the call was sent and paid for: its answer is returned, every guard is charged
    with RunGuard(name="outer") as outer, RunGuard(guards=[FailsWhenSettled()]) as inner:
        answer = ask(client)
    assert answer.usage.prompt_tokens == 7
    assert fake.wire_count == 1
    for guard in (inner, outer):
        assert (guard.usage.calls, guard.usage.input_tokens, guard.usage.output_tokens) == (1, 7, 3)


def test_a_guard_that_needs_prices_refuses_unpriced_models(fake: FakeProvider, client) -> None:
    rule = RefuseModel("nothing")
    rule.needs_price = True
    with RunGuard(guards=[rule]) as guard:
        with pytest.raises(UnknownModelPrice):
            ask(client, model="my-private-finetune")
        ask(client, model="gpt-4o-mini")
    assert [r.model for r in fake.requests] == ["gpt-4o-mini"]
    assert guard.usage.calls == 1


@pytest.mark.parametrize(
    "bad",
    [object(), "max_calls", 3, RefuseModel, lambda request, account: None],
    ids=["object", "str", "int", "class", "function"],
)
def test_a_non_guard_object_is_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match="guards"):
        RunGuard(guards=[bad])


def test_a_guard_class_is_rejected_even_with_the_protocols_attributes() -> None:
    class AllowAll:
        name = "allow_all"
        needs_price = False

        def admit(self, request, account):
            return None

        def settled(self, request, result, account):
            return None

    with pytest.raises(TypeError, match=r"class AllowAll, pass an instance \(AllowAll\(...\)\)"):
        RunGuard(guards=[AllowAll])
    RunGuard(guards=[AllowAll()])


def test_guards_must_be_an_iterable_of_guards() -> None:
    with pytest.raises(TypeError, match="guards"):
        RunGuard(guards=RefuseModel("gpt-4o"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="guards"):
        RunGuard(guards="max_calls")  # type: ignore[arg-type]
