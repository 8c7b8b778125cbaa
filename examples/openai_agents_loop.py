"""An OpenAI Agents SDK run that would loop, stopped by a RunGuard's max_calls.

Run it with ``python examples/openai_agents_loop.py`` in the frameworks
virtualenv (``make test-frameworks`` builds ``.venv-frameworks``; it needs
``openai-agents``) and no API key: the model is runguard's FakeProvider,
scripted to call the same tool on every turn. The agent code is the SDK's own;
RunGuard sees its calls because they go through an ``openai.AsyncOpenAI`` client.
"""

from __future__ import annotations

import asyncio

from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

set_tracing_disabled(True)  # this example exports no traces

# --- illustrative: a scripted model instead of the real API ------------------------------------
# In production the SDK builds its own AsyncOpenAI client; here the default
# client is one whose HTTP goes to the fake, which always asks for the tool again.
fake = FakeProvider(default=Reply(tool_calls=(("search_orders", {"customer": "ACME"}),)))
set_default_openai_client(fake.async_openai(), use_for_tracing=False)
# ------------------------------------------------------------------------------------------------


@function_tool
def search_orders(customer: str) -> str:
    """Find a customer's orders."""
    return "ORD-1042: late (carrier delay)"


agent = Agent(
    name="support",
    instructions="Answer questions about orders.",
    model="gpt-4o-mini",
    tools=[search_orders],
)


async def main() -> None:
    # max_turns=50 would let the stuck agent make 50 calls; the guard refuses the 9th.
    guard = RunGuard(max_calls=8, max_cost_usd=0.05, name="agents-sdk")
    try:
        async with guard:
            await Runner.run(agent, "Why was ACME's last order late?", max_turns=50)
    except BudgetExceeded as exc:
        print(f"stopped: {exc}")

    usage = guard.usage
    print(f"calls admitted: {usage.calls}")
    print(f"tokens: {usage.input_tokens} in, {usage.output_tokens} out")
    print(f"cost: ${usage.cost_usd:.6f}")
    # --- illustrative: only the fake can count what really left the process ---------------------
    print(f"requests that reached the provider: {fake.wire_count}")


if __name__ == "__main__":
    asyncio.run(main())
