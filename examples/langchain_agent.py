"""A LangGraph ReAct agent (LangChain's ChatOpenAI) under a RunGuard, unmodified.

Run it with ``python examples/langchain_agent.py`` in the frameworks virtualenv
(``make test-frameworks`` builds ``.venv-frameworks``; it needs
``langchain-openai`` and ``langgraph``) and no API key: the model is runguard's
FakeProvider, scripted to get stuck calling the same tool. RunGuard has no
LangChain adapter: ChatOpenAI builds an ``openai`` client, and RunGuard hooks
every ``openai`` client.
"""

from __future__ import annotations

import warnings

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

# --- illustrative: a scripted model instead of the real API ------------------------------------
# In production this block is `model = ChatOpenAI(model="gpt-4o-mini")`. Here the
# HTTP under ChatOpenAI's own openai client is the fake's, which always asks
# for the same tool again.
fake = FakeProvider(default=Reply(tool_calls=(("search_orders", {"customer": "ACME"}),)))
model = ChatOpenAI(
    model="gpt-4o-mini",
    api_key="test-key",
    base_url="http://runguard.fake/v1",
    http_client=fake.openai()._client,
    http_async_client=fake.async_openai()._client,
)
# ------------------------------------------------------------------------------------------------


@tool
def search_orders(customer: str) -> str:
    """Find a customer's orders."""
    print(f"  tool search_orders({customer!r})")
    return "ORD-1042: late (carrier delay)"


with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # create_react_agent now also lives in langchain.agents
    agent = create_react_agent(model, [search_orders])


def main() -> None:
    # recursion_limit=100 would let the stuck loop make 50 model calls; the guard
    # refuses the 7th before it is sent.
    guard = RunGuard(max_calls=6, max_cost_usd=0.05, name="langgraph-agent")
    try:
        with guard:
            agent.invoke(
                {"messages": [("user", "Why was ACME's last order late?")]},
                {"recursion_limit": 100},
            )
    except BudgetExceeded as exc:
        print(f"stopped: {exc}")

    usage = guard.usage
    print(f"calls admitted: {usage.calls}")
    print(f"tokens: {usage.input_tokens} in, {usage.output_tokens} out")
    print(f"cost: ${usage.cost_usd:.6f}")
    # --- illustrative: only the fake can count what really left the process ---------------------
    print(f"requests that reached the provider: {fake.wire_count}")


if __name__ == "__main__":
    main()
