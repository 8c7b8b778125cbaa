"""LangChain chat models under a RunGuard: unmodified ``ChatOpenAI`` / ``ChatAnthropic`` code.

Each model builds its own ``openai`` / ``anthropic`` client, as in production;
only the HTTP under that client is the fake provider's. The code under test is
a loop that would make more calls than the guard allows. Ground truth is the
fake's wire: exactly N requests arrive, the N+1th raises ``BudgetExceeded``
out of LangChain unchanged, and the guard's figures match what the fake sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _wire import anthropic_http, assert_stopped_at, openai_http

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

ChatOpenAI = pytest.importorskip("langchain_openai").ChatOpenAI
langchain_anthropic = pytest.importorskip("langchain_anthropic")
lc_anthropic_models = pytest.importorskip("langchain_anthropic.chat_models")

N = 3
REPLY = Reply(text="The order ships on Monday.", input_tokens=120, output_tokens=9)


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=REPLY)


def chat_openai(fake: FakeProvider) -> Any:
    return ChatOpenAI(
        model="gpt-4o-mini",
        api_key="test-key",
        base_url="http://runguard.fake/v1",
        http_client=openai_http(fake),
        http_async_client=openai_http(fake, is_async=True),
        max_tokens=64,
    )


def chat_anthropic(fake: FakeProvider, monkeypatch: pytest.MonkeyPatch) -> Any:
    # ChatAnthropic takes no http_client: it asks these two (cached) factories for one.
    monkeypatch.setattr(
        lc_anthropic_models, "_get_default_httpx_client", lambda **_: anthropic_http(fake)
    )
    monkeypatch.setattr(
        lc_anthropic_models,
        "_get_default_async_httpx_client",
        lambda **_: anthropic_http(fake, is_async=True),
    )
    return langchain_anthropic.ChatAnthropic(
        model="claude-haiku-4-5",
        api_key="test-key",
        base_url="http://runguard.fake",
        max_tokens=64,
    )


@pytest.fixture(params=["openai", "anthropic"])
def model(request: pytest.FixtureRequest, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch):
    if request.param == "openai":
        return chat_openai(fake)
    return chat_anthropic(fake, monkeypatch)


def wire_path(model: Any) -> str:
    return "/v1/chat/completions" if isinstance(model, ChatOpenAI) else "/v1/messages"


def test_invoke_loop_stops_at_the_bar(model: Any, fake: FakeProvider) -> None:
    answers: list[str] = []
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught, guard:
        for _ in range(N + 5):
            answers.append(model.invoke("Where is my order?").content)
    assert answers == [REPLY.text] * N
    assert fake.count(wire_path(model)) == N
    assert_stopped_at(N, guard, fake, REPLY, caught.value)


async def test_ainvoke_loop_stops_at_the_bar(model: Any, fake: FakeProvider) -> None:
    answers: list[str] = []
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught:
        async with guard:
            for _ in range(N + 5):
                answers.append((await model.ainvoke("Where is my order?")).content)
    assert answers == [REPLY.text] * N
    assert_stopped_at(N, guard, fake, REPLY, caught.value)


def test_stream_loop_stops_at_the_bar(model: Any, fake: FakeProvider) -> None:
    texts: list[str] = []
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught, guard:
        for _ in range(N + 5):
            texts.append("".join(str(chunk.content) for chunk in model.stream("Where?")))
    assert texts == [REPLY.text] * N
    assert all(request.body["stream"] is True for request in fake.requests)
    assert_stopped_at(N, guard, fake, REPLY, caught.value)


async def test_astream_loop_stops_at_the_bar(model: Any, fake: FakeProvider) -> None:
    texts: list[str] = []
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught:
        async with guard:
            for _ in range(N + 5):
                pieces = [str(chunk.content) async for chunk in model.astream("Where?")]
                texts.append("".join(pieces))
    assert texts == [REPLY.text] * N
    assert all(request.body["stream"] is True for request in fake.requests)
    assert_stopped_at(N, guard, fake, REPLY, caught.value)


def test_batch_in_langchains_thread_pool_stops_at_the_bar(model: Any, fake: FakeProvider) -> None:
    """``batch`` runs calls in worker threads; LangChain copies the context into them."""
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught, guard:
        model.batch(["Where?"] * (N + 5), config={"max_concurrency": 2})
    assert_stopped_at(N, guard, fake, REPLY, caught.value)


async def test_abatch_concurrent_tasks_stop_at_the_bar(model: Any, fake: FakeProvider) -> None:
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught:
        async with guard:
            # every task runs to its end: otherwise the first refusal ends the test while an
            # admitted call may still be on its way to the wire, and its request is lost
            batch = model.abatch(["Where?"] * (N + 5), return_exceptions=True)
            await asyncio.wait_for(batch, timeout=30)
    assert_stopped_at(N, guard, fake, REPLY, caught.value)


def test_a_run_within_budget_reports_langchains_own_usage(model: Any, fake: FakeProvider) -> None:
    with RunGuard(max_calls=N) as guard:
        messages = [model.invoke("Where?") for _ in range(N)]
    assert not guard.tripped
    assert fake.wire_count == guard.usage.calls == N
    for message in messages:
        assert message.usage_metadata["input_tokens"] == REPLY.input_tokens
        assert message.usage_metadata["output_tokens"] == REPLY.output_tokens
    assert guard.usage.input_tokens == N * REPLY.input_tokens
