"""SupportBot: a multi-step support agent under layered daily and monthly budgets.

Run it with ``python examples/support_bot.py``. It needs ``openai`` and no API
key: the models are runguard's FakeProvider. Each ticket goes through five
steps (retrieval embedding, routing, a sub-agent, synthesis, a guardrail
check), each attributed with ``runguard.step``. Four lines set the policy:

* an alert when the day's spend reaches $90, and a refusal at $150;
* an alert when the month's spend reaches $3,000, and a refusal at $5,000.

To reach those lines in a few seconds, the demo divides every amount by
1,000 (``SCALE``) and makes each answer long. Budgets live in this
process's memory here; pass ``store=SQLiteStore(path)`` or
``store=RedisStore(url)`` to share them between processes and hosts.
"""

from __future__ import annotations

from runguard import Alert, Budget, BudgetExceeded, RunGuard, step
from runguard.stores import MemoryStore
from runguard.testing import FakeProvider, Reply

SCALE = 1 / 1000  # $90 -> $0.09, so the demo reaches each line quickly

# --- illustrative: scripted models instead of the real APIs ------------------------------------
fake = FakeProvider(
    default=Reply(text="Your refund was issued.", input_tokens=6_000, output_tokens=800)
)
client = fake.openai()
# ------------------------------------------------------------------------------------------------

alerts: list[Alert] = []
store = MemoryStore()  # shared by every ticket's RunGuard
shared = {"store": store, "on_alert": alerts.append}
POLICY = [
    Budget("daily-alert", max_cost_usd=90 * SCALE, period="day", action="alert", **shared),
    Budget("daily", max_cost_usd=150 * SCALE, period="day", **shared),
    Budget("monthly-alert", max_cost_usd=3_000 * SCALE, period="month", action="alert", **shared),
    Budget("monthly", max_cost_usd=5_000 * SCALE, period="month", **shared),
]


def ask(model: str, prompt: str, max_tokens: int = 800) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
    )
    return reply.choices[0].message.content or ""


def handle_ticket(ticket: str) -> str:
    with step("retrieval", role="embedder"):
        client.embeddings.create(model="text-embedding-3-small", input=ticket)
    with step("routing", role="orchestrator"):
        route = ask("gpt-4o-mini", f"Which agent handles: {ticket}?", max_tokens=20)
    with step("refund-agent", role="sub-agent"):
        finding = ask("gpt-4o", f"Investigate: {ticket} (route: {route})")
    with step("synthesis", role="orchestrator"):
        answer = ask("gpt-4o", f"Write the customer reply from: {finding}")
    with step("guardrail", role="reviewer"):
        ask("gpt-4o-mini", f"Check tone and PII: {answer}", max_tokens=50)
    return answer


def main() -> None:
    totals = RunGuard(name="support-bot", budgets=POLICY)  # the day's report, across tickets
    handled = refused = 0
    with totals:
        for number in range(1, 41):
            try:
                with RunGuard(name=f"ticket-{number}", max_calls=10):
                    handle_ticket(f"ticket #{number}: where is my refund?")
                handled += 1
            except BudgetExceeded as exc:
                refused += 1
                if refused == 1:
                    print(f"ticket {number} refused: {exc}")

    print(f"tickets handled: {handled}, refused: {refused}")
    for alert in alerts:
        print(f"alert: {alert.name} at ${alert.value:.4f} of ${alert.limit:.4f}")
    print()
    print(totals.report())
    # --- illustrative: only the fake can count what really left the process ---------------------
    print(f"\nrequests that reached the provider: {fake.wire_count}")


if __name__ == "__main__":
    main()
