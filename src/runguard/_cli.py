"""The ``runguard`` command. ``runguard demo`` shows the breaker stop a runaway agent.

The demo drives the real ``openai`` SDK against :class:`runguard.testing.FakeProvider`
(an in-memory endpoint), so it runs offline, without an API key, in about a second.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from ._errors import BudgetExceeded
from ._guard import RunGuard
from ._records import Trip, Usage
from .pricing import dollars
from .testing import FakeProvider, Reply, WireRequest

MODEL = "gpt-4o"
MAX_CALLS = 30
MAX_COST_USD = 0.25
#: output cap of each request: the guard reserves this much output before sending
MAX_TOKENS = 1024

_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_orders",
            "description": "Search a customer's orders.",
            "parameters": {
                "type": "object",
                "properties": {"customer": {"type": "string"}, "status": {"type": "string"}},
                "required": ["customer"],
            },
        },
    }
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="runguard",
        description="RunGuard: an in-process circuit breaker for LLM agents.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="stop a runaway agent loop (offline: a fake OpenAI endpoint, no API key)",
        description="Run a runaway tool-calling agent inside a RunGuard and show the trip.",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors: return the code, don't exit
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "demo":
        return demo()
    parser.print_help(sys.stderr)
    return 2


def demo() -> int:
    fake = FakeProvider(responder=_runaway_model)
    client = fake.openai()
    print(f"A ReAct agent asks {MODEL} for its next step. The model keeps asking for the same")
    print("tool, and each tool result makes the history, and so the next call, bigger.")
    print("The SDK is the real openai client; the endpoint is an in-memory fake.")
    print()
    print(f"with RunGuard(max_calls={MAX_CALLS}, max_cost_usd={MAX_COST_USD}, name='demo-agent'):")

    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You help support staff with customer orders."},
        {"role": "user", "content": "Why was ACME's last order late?"},
    ]
    guard = RunGuard(max_calls=MAX_CALLS, max_cost_usd=MAX_COST_USD, name="demo-agent")
    try:
        with guard:
            for step in range(1, MAX_CALLS + 2):  # the guard must refuse by call MAX_CALLS + 1
                reply = client.chat.completions.create(
                    model=MODEL, messages=messages, tools=_TOOLS, max_tokens=MAX_TOKENS
                )
                message = reply.choices[0].message
                messages.append(message.model_dump(exclude_none=True))
                for call in message.tool_calls or []:
                    messages.append(
                        {"role": "tool", "tool_call_id": call.id, "content": _search_orders()}
                    )
                tools = ", ".join(call.function.name for call in message.tool_calls or [])
                print(
                    f"  step {step:>2}  model asks for {tools}  prompt "
                    f"{reply.usage.prompt_tokens:>6,} tokens  spent so far "
                    f"${guard.usage.cost_usd:.4f}"
                )
    except BudgetExceeded as exc:
        print(f"  step {step:>2}  refused before sending: raised {type(exc).__name__}")
        print()
        print(_report(guard.usage, exc.trip, fake.wire_count, step))
        return 0
    print("error: the guard never tripped", file=sys.stderr)
    return 1


def _runaway_model(request: WireRequest) -> Reply:
    # The fake bills about four characters a token, and reports the stable
    # prefix of the history (everything before the latest tool turn) as cached.
    messages = request.body["messages"]
    prompt = len(json.dumps(messages)) // 4
    cached = len(json.dumps(messages[:-2])) // 4 if len(messages) > 2 else 0
    return Reply(
        tool_calls=(("search_orders", {"customer": "ACME", "status": "late"}),),
        input_tokens=prompt,
        cache_read_tokens=cached,
        output_tokens=28,
    )


def _search_orders() -> str:
    orders = [
        {"id": f"ORD-{n:05}", "customer": "ACME", "status": "late", "items": n % 7 + 1}
        for n in range(40)
    ]
    return json.dumps(orders)


def _report(usage: Usage, trip: Trip, wire_count: int, refused_step: int) -> str:
    sections = [
        _table(
            "Usage of RunGuard 'demo-agent'",
            [
                ("calls", f"{usage.calls}"),
                ("input tokens", f"{usage.input_tokens:,}"),
                ("output tokens", f"{usage.output_tokens:,}"),
                ("cached input tokens", f"{usage.cache_read_tokens:,}"),
                ("cost", f"${usage.cost_usd:.4f}"),
                ("LLM seconds", f"{usage.llm_seconds:.3f}"),
                ("estimated calls", f"{usage.estimated_calls}"),
            ],
        ),
        _table(
            "Trip",
            [
                ("guard", trip.guard),
                ("limit", _amount(trip.guard, trip.limit)),
                ("observed", _amount(trip.guard, trip.observed)),
                ("reason", trip.reason),
            ],
        ),
        _table(
            "Wire",
            [
                ("requests that reached the wire", f"{wire_count}"),
                ("calls the guard admitted", f"{usage.calls}"),
                ("refused call", f"step {refused_step}, never sent"),
            ],
        ),
    ]
    return "\n\n".join(sections)


def _amount(guard: str, value: float) -> str:
    # as the trip's reason words it, so the table and the reason agree
    return dollars(value) if guard == "max_cost_usd" else f"{value:,.0f}"


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    lines = [title, "-" * len(title)]
    for label, value in rows:
        text = textwrap.fill(
            value,
            width=88,
            initial_indent=f"  {label:<{width}}  ",
            subsequent_indent=" " * (width + 4),
        )
        lines.append(text)
    return "\n".join(lines)
