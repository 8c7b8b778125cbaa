"""A retry storm against a rate-limited gateway, cut off after five 429s.

Run it with ``python examples/retry_storm.py``. It needs ``openai`` and no API
key: the "gateway" is runguard's FakeProvider, answering every request with
429 (too many requests). The client retries each call twice by itself, and
the agent retries the whole step on top: without a guard, ten steps would
send thirty requests into the wall. With ``max_consecutive_429s=5`` RunGuard
counts every HTTP attempt, the SDK's own retries included, and the fifth 429
is the last request that leaves the process.
"""

from __future__ import annotations

import openai

from runguard import RateLimitStorm, RunGuard
from runguard.testing import FakeProvider, Reply

# --- illustrative: a gateway that is out of capacity ------------------------------------------
fake = FakeProvider(default=Reply(status=429, headers={"retry-after-ms": "20"}))
client = fake.openai(max_retries=2)  # the SDK's default: each call is up to 3 requests
# ------------------------------------------------------------------------------------------------


def summarise(ticket: str) -> str:
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"Summarise this ticket: {ticket}"}],
        max_tokens=200,
    )
    return reply.choices[0].message.content or ""


def main() -> None:
    guard = RunGuard(max_consecutive_429s=5, name="ticket-summaries")
    try:
        with guard:
            for step in range(1, 11):
                try:
                    print(summarise(f"ticket #{step}"))
                except openai.RateLimitError:
                    # what agents do: shrug and try the next step
                    print(f"step {step}: the provider said 'too many requests', moving on")
    except RateLimitStorm as exc:
        print(f"stopped: {exc}")
        print(f"retry after (s): {exc.trip.details.get('retry_after')}")

    usage = guard.usage
    print(f"calls made: {usage.calls}")
    print(f"429 answers: {usage.rate_limited_attempts}")
    # --- illustrative: only the fake can count what really left the process ---------------------
    print(f"requests that reached the provider: {fake.wire_count}")


if __name__ == "__main__":
    main()
