"""A ReAct agent loop under a RunGuard: the loop that never ends is stopped before it bills.

Run it with ``python examples/react_loop.py``. It needs ``openai`` and no API
key: the model is runguard's FakeProvider, scripted to get stuck calling the
same tool. Everything outside the "illustrative" blocks is what you would
write in your own agent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

# --- illustrative: a scripted model instead of the real API ------------------------------------
# A real agent would use `client = openai.OpenAI()`. The fake answers like the
# API does: first two sensible tool calls, then the same search over and over.
fake = FakeProvider(default=Reply(tool_calls=(("search_orders", {"customer": "ACME"}),)))
fake.script(
    Reply(tool_calls=(("search_orders", {"customer": "ACME"}),), input_tokens=400),
    Reply(tool_calls=(("get_order", {"order_id": "ORD-1042"}),), input_tokens=700),
)
client = fake.openai()
# ------------------------------------------------------------------------------------------------


def search_orders(customer: str) -> list[dict[str, Any]]:
    return [
        {"order_id": f"ORD-{1040 + n}", "customer": customer, "status": "late"} for n in range(5)
    ]


def get_order(order_id: str) -> dict[str, Any]:
    return {"order_id": order_id, "status": "late", "reason": "carrier delay"}


TOOLS: dict[str, Callable[..., Any]] = {"search_orders": search_orders, "get_order": get_order}
TOOL_SPECS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {arg: {"type": "string"}}},
        },
    }
    for name, arg in (("search_orders", "customer"), ("get_order", "order_id"))
]


def run_agent(question: str, max_steps: int = 50) -> str:
    """Reason, act, observe, until the model answers (or something stops it)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for _ in range(max_steps):
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=TOOL_SPECS, max_tokens=512
        )
        message = reply.choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            result = TOOLS[call.function.name](**json.loads(call.function.arguments))
            print(f"  tool {call.function.name}({call.function.arguments})")
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}
            )
    return "gave up"


def main() -> None:
    # max_steps=50 above would let a stuck loop make 50 calls; the guard caps
    # calls and dollars across the whole run, whichever comes first, and
    # refuses the call that would cross a ceiling before it is sent.
    # (Decorating run_agent with @runguard.guarded(max_calls=8, ...) gives each
    # of its calls a fresh guard of its own instead.)
    guard = RunGuard(max_calls=8, max_cost_usd=0.05, name="order-agent")
    try:
        with guard:
            print(run_agent("Why was ACME's last order late?"))
    except BudgetExceeded as exc:
        trip = exc.trip
        print(f"stopped: {exc}")
        print(f"trip: guard={trip.guard} limit={trip.limit:g} observed={trip.observed:g}")

    usage = guard.usage
    print(f"calls admitted: {usage.calls}")
    print(f"tokens: {usage.input_tokens} in, {usage.output_tokens} out")
    print(f"cost: ${usage.cost_usd:.6f}")
    # --- illustrative: only the fake can count what really left the process ---------------------
    print(f"requests that reached the provider: {fake.wire_count}")


if __name__ == "__main__":
    main()
