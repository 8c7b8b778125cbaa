"""A LangGraph prebuilt ReAct agent whose model never stops calling its tool.

``create_react_agent`` loops model -> tool -> model until the model answers
without a tool call or ``recursion_limit`` is hit. The fake model always asks
for the tool again, so only the guard can stop it: exactly N model requests
reach the provider, the tool runs after each of them, and the N+1th model call
raises ``BudgetExceeded`` out of the graph.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from _wire import anthropic_http, assert_stopped_at, openai_http

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI
langchain_anthropic = pytest.importorskip("langchain_anthropic")
lc_anthropic_models = pytest.importorskip("langchain_anthropic.chat_models")
tool = pytest.importorskip("langchain_core.tools").tool
prebuilt = pytest.importorskip("langgraph.prebuilt")

N = 4
STUCK = Reply(
    tool_calls=(("search_orders", {"customer": "ACME"}),), input_tokens=300, output_tokens=12
)
#: far above N: the graph's own limit is not what stops the run
RECURSION_LIMIT = 100


def build_agent(model: Any, calls: list[str]) -> Any:
    @tool
    def search_orders(customer: str) -> str:
        """Find a customer's orders."""
        calls.append(customer)
        return "ORD-1042: late (carrier delay)"

    with warnings.catch_warnings():
        # create_react_agent is deprecated in favour of langchain.agents.create_agent
        # (in the `langchain` package); it is still LangGraph's prebuilt ReAct loop.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return prebuilt.create_react_agent(model, [search_orders])


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=STUCK)


@pytest.fixture(params=["openai", "anthropic"])
def model(request: pytest.FixtureRequest, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch):
    if request.param == "openai":
        return ChatOpenAI(
            model="gpt-4o-mini",
            api_key="test-key",
            base_url="http://runguard.fake/v1",
            http_client=openai_http(fake),
            http_async_client=openai_http(fake, is_async=True),
        )
    monkeypatch.setattr(
        lc_anthropic_models, "_get_default_httpx_client", lambda **_: anthropic_http(fake)
    )
    monkeypatch.setattr(
        lc_anthropic_models,
        "_get_default_async_httpx_client",
        lambda **_: anthropic_http(fake, is_async=True),
    )
    return langchain_anthropic.ChatAnthropic(
        model="claude-haiku-4-5", api_key="test-key", base_url="http://runguard.fake"
    )


QUESTION = {"messages": [("user", "Why was ACME's last order late?")]}
CONFIG = {"recursion_limit": RECURSION_LIMIT}


def test_react_agent_invoke_is_stopped_by_max_calls(model: Any, fake: FakeProvider) -> None:
    calls: list[str] = []
    agent = build_agent(model, calls)
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught, guard:
        agent.invoke(QUESTION, CONFIG)
    assert calls == ["ACME"] * N  # the tool ran after each admitted model call
    assert_stopped_at(N, guard, fake, STUCK, caught.value)


async def test_react_agent_ainvoke_is_stopped_by_max_calls(model: Any, fake: FakeProvider) -> None:
    calls: list[str] = []
    agent = build_agent(model, calls)
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught:
        async with guard:
            await agent.ainvoke(QUESTION, CONFIG)
    assert calls == ["ACME"] * N
    assert_stopped_at(N, guard, fake, STUCK, caught.value)


def test_react_agent_streaming_tokens_is_stopped_by_max_calls(
    model: Any, fake: FakeProvider
) -> None:
    """``stream_mode="messages"`` makes every model call a streaming request."""
    calls: list[str] = []
    agent = build_agent(model, calls)
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught, guard:
        for _ in agent.stream(QUESTION, CONFIG, stream_mode="messages"):
            pass
    assert all(request.body["stream"] is True for request in fake.requests)
    assert calls == ["ACME"] * N
    assert_stopped_at(N, guard, fake, STUCK, caught.value)


def test_without_a_guard_only_the_graphs_step_limit_stops_it(
    model: Any, fake: FakeProvider
) -> None:
    """The control: the same agent, unguarded, goes far past N before LangGraph gives up."""
    calls: list[str] = []
    agent = build_agent(model, calls)
    result = agent.invoke(QUESTION, {"recursion_limit": 20})
    # model and tool steps alternate; the prebuilt agent ends itself with an apology
    # ("Sorry, need more steps ...") when it has too few steps left
    assert fake.wire_count > 2 * N
    assert len(calls) == fake.wire_count - 1
    assert "need more steps" in result["messages"][-1].content
