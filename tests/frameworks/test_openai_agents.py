"""The OpenAI Agents SDK: a ``Runner.run`` that would loop is stopped by ``max_calls``.

The agent has a tool the fake model asks for on every turn, and ``max_turns``
far above the bar, so without a guard the run would go on until the SDK's own
turn limit. The model is given an ``AsyncOpenAI`` client whose HTTP is the
fake's (the SDK takes one per model, or as the process default); everything
else is the SDK's own code. Tracing export is off.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from _wire import assert_stopped_at

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

agents = pytest.importorskip("agents")

N = 5
MAX_TURNS = 50
STUCK = Reply(
    tool_calls=(("search_orders", {"customer": "ACME"}),), input_tokens=250, output_tokens=15
)


@pytest.fixture(autouse=True)
def no_tracing_export() -> None:
    agents.set_tracing_disabled(True)


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=STUCK)


def build_agent(model: Any, calls: list[str]) -> Any:
    @agents.function_tool
    def search_orders(customer: str) -> str:
        """Find a customer's orders."""
        calls.append(customer)
        return "ORD-1042: late (carrier delay)"

    return agents.Agent(
        name="support", instructions="Answer order questions.", tools=[search_orders], model=model
    )


@pytest.fixture(params=["responses", "chat_completions"])
def model(request: pytest.FixtureRequest, fake: FakeProvider) -> Any:
    client = fake.async_openai()
    if request.param == "responses":
        return agents.OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client)
    return agents.OpenAIChatCompletionsModel(model="gpt-4o-mini", openai_client=client)


async def test_runner_run_is_stopped_by_max_calls(model: Any, fake: FakeProvider) -> None:
    calls: list[str] = []
    agent = build_agent(model, calls)
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught:
        async with guard:
            await agents.Runner.run(agent, "Why was ACME's order late?", max_turns=MAX_TURNS)
    # every admitted answer asked for the tool once, and the SDK ran it each time
    assert calls == ["ACME"] * N
    assert_stopped_at(N, guard, fake, STUCK, caught.value)


def test_runner_run_sync_is_stopped_by_max_calls(model: Any, fake: FakeProvider) -> None:
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught, guard:
        agents.Runner.run_sync(build_agent(model, []), "Why?", max_turns=MAX_TURNS)
    assert_stopped_at(N, guard, fake, STUCK, caught.value)


async def test_runner_run_streamed_is_stopped_by_max_calls(fake: FakeProvider) -> None:
    # streamed tool calls: the fake streams them for chat completions only
    model = agents.OpenAIChatCompletionsModel(
        model="gpt-4o-mini", openai_client=fake.async_openai()
    )
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught:
        async with guard:
            result = agents.Runner.run_streamed(build_agent(model, []), "Why?", max_turns=MAX_TURNS)
            async for _ in result.stream_events():
                pass
    assert all(request.body["stream"] is True for request in fake.requests)
    assert_stopped_at(N, guard, fake, STUCK, caught.value)


@pytest.fixture
def default_client(fake: FakeProvider) -> Iterator[None]:
    shared = pytest.importorskip("agents.models._openai_shared")
    before = shared.get_default_openai_client()
    agents.set_default_openai_client(fake.async_openai(), use_for_tracing=False)
    yield
    shared.set_default_openai_client(before)


async def test_agent_on_the_default_client_is_stopped_by_max_calls(
    default_client: None, fake: FakeProvider
) -> None:
    """``Agent(model="gpt-4o-mini")``: the SDK builds the model on the process-wide client."""
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught:
        async with guard:
            await agents.Runner.run(build_agent("gpt-4o-mini", []), "Why?", max_turns=MAX_TURNS)
    assert fake.count("/v1/responses") == N
    assert_stopped_at(N, guard, fake, STUCK, caught.value)


async def test_without_a_guard_the_sdks_turn_limit_is_what_stops_it(
    model: Any, fake: FakeProvider
) -> None:
    """The control: unguarded, the same run makes ``max_turns`` calls."""
    with pytest.raises(agents.MaxTurnsExceeded):
        await agents.Runner.run(build_agent(model, []), "Why?", max_turns=3 * N)
    assert fake.wire_count == 3 * N
