"""A tool loop: the model keeps asking for the same lookup, and is stopped after the third.

Run it with ``python examples/tool_loop.py``. It needs ``anthropic`` and no API
key: the model is runguard's FakeProvider, scripted to ask for one different
lookup first and then the same one forever. Every single call is cheap and
within any dollar ceiling; what is wrong is the repetition, and
``max_repeated_tool_calls=3`` sees it: the same tool with the same arguments
(compared as JSON, so key order and spacing do not matter) three times within
the last 20 calls. The call after that is refused before it is sent.
"""

from __future__ import annotations

import json
from typing import Any

from runguard import LoopDetected, RunGuard
from runguard.testing import FakeProvider, Reply

# --- illustrative: a scripted model instead of the real API ------------------------------------
fake = FakeProvider(default=Reply(tool_calls=(("lookup_invoice", {"invoice": "INV-7"}),)))
fake.script(Reply(tool_calls=(("lookup_customer", {"name": "ACME"}),)))
client = fake.anthropic()
# ------------------------------------------------------------------------------------------------

TOOLS = [
    {
        "name": name,
        "description": f"Look up a {kind}.",
        "input_schema": {"type": "object", "properties": {arg: {"type": "string"}}},
    }
    for name, kind, arg in (
        ("lookup_customer", "customer", "name"),
        ("lookup_invoice", "invoice", "invoice"),
    )
]


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"tool": name, "found": arguments, "status": "unpaid"})


def run_agent(question: str, max_steps: int = 30) -> str:
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for _ in range(max_steps):
        reply = client.messages.create(
            model="claude-haiku-4-5", max_tokens=300, tools=TOOLS, messages=messages
        )
        uses = [block for block in reply.content if block.type == "tool_use"]
        if not uses:
            return "".join(block.text for block in reply.content if block.type == "text")
        messages.append({"role": "assistant", "content": [b.model_dump() for b in reply.content]})
        results = []
        for use in uses:
            print(f"  tool {use.name}({json.dumps(use.input)})")
            results.append(
                {
                    "type": "tool_result",
                    "tool_use_id": use.id,
                    "content": run_tool(use.name, use.input),
                }
            )
        messages.append({"role": "user", "content": results})
    return "gave up"


def main() -> None:
    guard = RunGuard(max_repeated_tool_calls=3, max_cost_usd=1.00, name="billing-agent")
    try:
        with guard:
            print(run_agent("Does ACME have unpaid invoices?"))
    except LoopDetected as exc:
        print(f"stopped: {exc}")
        print(f"repeated tool: {exc.trip.details['tool']} {exc.trip.details['arguments']}")

    usage = guard.usage
    print(f"calls admitted: {usage.calls}")
    print(f"cost: ${usage.cost_usd:.6f}")
    # --- illustrative: only the fake can count what really left the process ---------------------
    print(f"requests that reached the provider: {fake.wire_count}")


if __name__ == "__main__":
    main()
