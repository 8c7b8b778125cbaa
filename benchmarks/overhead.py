"""What RunGuard adds to an openai ``chat.completions.create`` call, per call.

Run ``python benchmarks/overhead.py`` (about ten minutes here) or ``--quick`` (under a
minute).
Every figure is the median over rounds of a paired difference: in each round
the arms being compared run once each, in a random order, in one process.

Whole SDK call (in situ). A real ``openai.OpenAI`` client over FakeProvider's
in-memory transport: a few ms a call here, nearly all of it the SDK's own work.
Ten arms per round, the paired figure being each arm minus "unpatched":

* unpatched (twice): a second client from the same fake, on which each
  method RunGuard hooks is shadowed by the SDK's original, bound on the
  instance (classes are never switched while timing: assigning a class
  attribute empties CPython's method caches and costs the next call ~20 µs).
  It runs as if runguard had never been imported. The difference of the two
  unpatched arms is the noise floor.
* fast path: hooks installed, no guard active: what every openai call pays
  once runguard has instrumented the SDK.
* new guard / old guard: inside a ``RunGuard`` with ``max_calls``, the three
  token ceilings and ``max_cost_usd`` all set (none trips), so each call is
  described, token-counted, priced, admitted and settled. "new" is a guard at
  its first calls; "old" has already admitted and settled 100,000 calls.
* every guard: the five ceilings and every failure-mode guard.
* swept: unpatched and new guard again, each after reading a buffer of
  ``SWEEP_BYTES`` (untimed), paired with each other. The read pushes the
  SDK's and RunGuard's code and data out of the core's own caches, as an
  agent's own work between two LLM calls does. Back to back, the other arms'
  calls find the SDK warm, which a real agent's seldom do; these two show what
  RunGuard adds when nothing is.
* yardstick, warm and swept: a client with one hook of ``minimal_guard.py``
  on ``request()``, which does only the bare work of the five ceilings (a
  length-based estimate, five checks and a reservation under a lock, the
  usage charged from the result). About the least any hook in Python adds,
  to compare RunGuard's figures with.

A fresh subprocess that never instruments the SDK also times the bare call, as a
cross-check of the unpatched arm (not paired: another process, another moment).

Library only. Driving 100,000 whole SDK calls would take minutes, so the long run
drives the hooks RunGuard installed on the SDK (their parts, compiled again
for the stub's methods as RunGuard compiles them for the SDK's) around a stub
of the SDK's call chain, ``request`` ->
``_send_request``, then ``_process_response`` -> ``_process_response_data``, which does none of the
SDK's own work (no request building, HTTP or response models). The request
options are the ones the SDK built for the whole-call benchmark. Each hooked
stub call is paired with an unhooked one. This is a hot loop: the same code
inside a real SDK call runs with colder caches and costs more, so the in-situ
figure above is what a call really pays; the long run shows whether the cost
grows with the number of calls a guard has seen (it must not), and the
history rows show how it grows with the size of the conversation sent.

Price lookup. One ``genai_prices.calc_price`` call against RunGuard's cached
rates for the same model, in batches of 100.

The bar (from the issue): at most 15 µs added per non-streaming call, flat.
"""

from __future__ import annotations

import argparse
import contextvars
import gc
import itertools
import random
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import minimal_guard

import runguard
from runguard.providers import _stainless
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o"
TOOL_TURN: list[dict[str, Any]] = [
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_order", "arguments": '{"order_id": "ORD-1042"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "late", "carrier": "X"}'},
]
# A ReAct step: system prompt, question, a tool round trip, a remark, a follow-up.
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a support agent. Use the tools to answer."},
    {"role": "user", "content": "Why was order ORD-1042 late, and is ORD-1043 affected too?"},
    *TOOL_TURN,
    {"role": "assistant", "content": "ORD-1042 was delayed by carrier X. Checking ORD-1043."},
    {"role": "user", "content": "Thanks. Please also check the shipping address."},
]
REPLY = Reply(text="Both orders ship with carrier X.", input_tokens=1000, output_tokens=100)
HUGE = 10**12
VARIANTS = 20  # loop window of the every-guard arm; twice as many requests cycle through it
LONG_RUN = 100_000
#: read before each call of the swept arms: several times one core's L2 cache here (1 MiB)
SWEEP_BYTES = 8 * 1024 * 1024


def sdk_call(client: Any, messages: list[dict[str, Any]] = MESSAGES) -> Callable[[], Any]:
    def call() -> Any:
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=256)

    return call


def new_guard() -> runguard.RunGuard:
    return runguard.RunGuard(
        max_calls=HUGE,
        max_input_tokens=HUGE,
        max_output_tokens=HUGE,
        max_total_tokens=HUGE,
        max_cost_usd=1e9,
        name="bench",
    )


def every_guard() -> runguard.RunGuard:
    """The five ceilings and every failure-mode guard, none of them near tripping."""
    return runguard.RunGuard(
        max_calls=HUGE,
        max_input_tokens=HUGE,
        max_output_tokens=HUGE,
        max_total_tokens=HUGE,
        max_cost_usd=1e9,
        max_input_tokens_per_call=HUGE,
        max_consecutive_429s=HUGE,
        max_total_429s=HUGE,
        max_llm_seconds=1e9,
        max_wall_seconds=1e9,
        max_repeated_tool_calls=VARIANTS,
        max_identical_requests=VARIANTS,
        loop_window=VARIANTS,
        name="bench-every",
    )


def variants() -> list[list[dict[str, Any]]]:
    """Requests that differ in their last message, cycled so no loop guard ever trips."""
    return [
        [*MESSAGES[:-1], {"role": "user", "content": f"{MESSAGES[-1]['content']} (case {i})"}]
        for i in range(VARIANTS * 2)
    ]


def cycling(calls: list[Callable[[], Any]]) -> Callable[[], Any]:
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def entered(
    make: Callable[[], runguard.RunGuard] | None = None,
) -> tuple[runguard.RunGuard, contextvars.Context]:
    """A guard entered in a context of its own, so calls can go in and out of it."""
    guard, ctx = (make or new_guard)(), contextvars.copy_context()
    ctx.run(guard.__enter__)
    return guard, ctx


def leave(guard: runguard.RunGuard, ctx: contextvars.Context) -> None:
    ctx.run(guard.__exit__, None, None, None)
    assert not guard.tripped


def unpatched_client(fake: FakeProvider) -> Any:
    """An openai client that runs the SDK's original methods, RunGuard's hooks bypassed.

    The hooks live on the SDK's classes; this client shadows each hooked method
    with the original on the instance, so nothing is switched while timing.
    """
    client = fake.openai()
    for cls in type(client).__mro__:
        for name, attr in vars(cls).items():
            if hasattr(attr, "runguard_hook") and name not in vars(client):
                setattr(client, name, types.MethodType(attr.__wrapped__, client))
    return client


def minimal_client(fake: FakeProvider) -> tuple[minimal_guard.Ceilings, tuple[Any, Any]]:
    """The yardstick's ceilings, and its arm: a client with only its hook, in its own context."""
    client = unpatched_client(fake)
    minimal_guard.install(client, client.request.__func__)
    ceilings = minimal_guard.Ceilings(MODEL)
    ctx = contextvars.copy_context()
    ctx.run(minimal_guard.active.set, ceilings)
    return ceilings, (ctx, sdk_call(client))


def installed_hook(cls: type, name: str) -> Any:
    """The parts (a ``Split``) of the hook RunGuard installed on ``cls.name``."""
    hooked = vars(cls)[name]
    if not hasattr(hooked, "runguard_hook"):
        raise RuntimeError(f"runguard's hook is not installed on {cls.__name__}.{name}")
    return hooked.runguard_hook


#: arm name -> (the context it runs in, the call)
Arms = dict[str, tuple[contextvars.Context, Callable[[], Any]]]


def rounds_of(
    rounds: int,
    arms: Arms,
    rng: random.Random,
    fake: FakeProvider | None = None,
    swept: frozenset[str] = frozenset(),
) -> dict[str, list[int]]:
    """Run each arm once a round, in random order; ns per call, by arm.

    Before each call of a ``swept`` arm, untimed, the CPU caches are filled with other data.
    """
    times: dict[str, list[int]] = {arm: [] for arm in arms}
    order = list(arms)
    sweep = bytearray(SWEEP_BYTES if swept else 0)
    for _ in range(rounds):
        rng.shuffle(order)
        for arm in order:
            ctx, fn = arms[arm]
            if arm in swept:
                sweep[::64]  # reads one byte of each cache line of the buffer
            started = time.perf_counter_ns()
            ctx.run(fn)
            times[arm].append(time.perf_counter_ns() - started)
        if fake is not None:
            fake.requests.clear()  # the fake keeps every request; don't let it grow
    return times


def paired(
    times: dict[str, list[int]], arm: str, base: str, lo: int = 0, hi: int | None = None
) -> float:
    """Median over rounds ``lo:hi`` of ``arm - base``, in µs."""
    pairs = zip(times[arm][lo:hi], times[base][lo:hi], strict=True)
    return statistics.median(a - b for a, b in pairs) / 1000


def median_us(values: list[int]) -> float:
    return statistics.median(values) / 1000


def bare_in_fresh_process(calls: int) -> float | None:
    done = subprocess.run(
        [sys.executable, __file__, "--bare-only", str(calls)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None
    return float(done.stdout.strip())


def bare_only(calls: int) -> None:
    import openai._base_client

    fake = FakeProvider(default=REPLY)
    call = sdk_call(fake.openai())
    times = []
    for i in range(calls + 50):
        started = time.perf_counter_ns()
        call()
        if i >= 50:  # after warm-up
            times.append(time.perf_counter_ns() - started)
        fake.requests.clear()
    assert not getattr(openai._base_client, "_runguard_patched", False)
    print(median_us(times))


def captured_options(client: Any, messages: list[dict[str, Any]]) -> Any:
    """The FinalRequestOptions the SDK builds for the benchmark call (nothing is sent)."""
    import openai._base_client as base

    class Captured(Exception):
        pass

    seen: list[Any] = []

    def capture(self: Any, cast_to: Any, options: Any, **kwargs: Any) -> Any:
        seen.append(options)
        raise Captured

    installed = vars(base.SyncAPIClient)["request"]
    base.SyncAPIClient.request = capture  # type: ignore[method-assign]
    try:
        sdk_call(client, messages)()
    except Captured:
        pass
    finally:
        base.SyncAPIClient.request = installed  # type: ignore[method-assign]
    return seen[0]


def stub_chain() -> tuple[type, type]:
    """(plain, hooked): openai's call chain with the SDK's own work taken out.

    Hooked the way RunGuard hooks the installed openai: per attempt
    (``_send_request``, openai 2.31 and newer) or per answer (``_build_request``
    and ``_process_response``, older releases).
    """
    import openai._base_client as base

    http = getattr(base, "httpx2", None) or base.httpx  # openai 3.x moved to httpx2
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": 1000,
            "completion_tokens": 100,
            "total_tokens": 1100,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    request = http.Request("POST", "http://runguard.fake/v1/chat/completions")
    response = http.Response(200, json=body, request=request)

    # The signatures and keyword calls of openai's SyncAPIClient and BaseClient.
    class Chain:
        def request(
            self, cast_to: Any, options: Any, *, stream: bool = False, stream_cls: Any = None
        ) -> Any:
            # The SDK gets a new response each call; this one must not carry the last tag.
            response.__dict__.pop("_runguard_call", None)
            built = self._build_request(options)
            sent = self._send_request(built, stream=stream)
            return self._process_response(
                cast_to=cast_to,
                options=options,
                response=sent,
                stream=stream,
                stream_cls=stream_cls,
                retries_taken=0,
            )

        def _build_request(self, options: Any, *, retries_taken: int = 0) -> Any:
            return request

        def _send_request(self, request: Any, *, stream: bool) -> Any:
            return response

        def _process_response(
            self,
            *,
            cast_to: Any,
            options: Any,
            response: Any,
            stream: bool,
            stream_cls: Any,
            retries_taken: int = 0,
        ) -> Any:
            return self._process_response_data(data=body, cast_to=cast_to, response=response)

        def _process_response_data(self, *, data: Any, cast_to: Any, response: Any) -> Any:
            return data

    class Hooked(Chain):
        pass

    hooks = [(base.SyncAPIClient, "request"), (base.BaseClient, "_process_response_data")]
    if hasattr(vars(base.SyncAPIClient).get("_send_request"), "runguard_hook"):
        hooks.append((base.SyncAPIClient, "_send_request"))
    else:
        hooks += [(base.BaseClient, "_build_request"), (base.SyncAPIClient, "_process_response")]
    for cls, name in hooks:
        # compiled around Chain's method, the way RunGuard compiles it for the SDK's
        setattr(Hooked, name, _stainless.compile_hook(Hooked, name, installed_hook(cls, name)))
    return Chain, Hooked


def row(label: str, value: float, unit: str = "µs/call", fmt: str = "+10.1f") -> None:
    print(f"  {label:<50}{value:{fmt}} {unit}".rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description="RunGuard's per-call overhead on openai.")
    parser.add_argument("--quick", action="store_true", help="a short run (seconds)")
    parser.add_argument("--bare-only", type=int, metavar="N", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_only:
        bare_only(args.bare_only)
        return 0

    sdk_n, long_n, lib_n = (100, 5_000, 1_000) if args.quick else (2_000, LONG_RUN, 20_000)
    print(f"Python {sys.version.split()[0]}, {'quick' if args.quick else 'full'} run")
    print("bare call in a fresh, never-instrumented process ...", flush=True)
    fresh_us = bare_in_fresh_process(max(sdk_n, 200))

    fake = FakeProvider(default=REPLY)
    client = fake.openai()
    call = sdk_call(client)
    rng = random.Random(42)
    bare = contextvars.copy_context()
    with new_guard():  # instruments the SDK; warms prices, token counts, lazy SDK imports
        for _ in range(50):
            call()
    raw = sdk_call(unpatched_client(fake))
    with new_guard() as check:
        raw()
    assert check.usage.calls == 0, "the unpatched client went through RunGuard"
    yardstick, minimal = minimal_client(fake)
    long_history = MESSAGES[:2] + TOOL_TURN * 50
    options = captured_options(client, MESSAGES)
    long_options = captured_options(client, long_history)
    Chain, Hooked = stub_chain()
    plain, hooked = Chain(), Hooked()
    varied = variants()
    every_sdk = cycling([sdk_call(client, messages) for messages in varied])
    with runguard.RunGuard():  # warm the token counts of the variants
        every_sdk()
        for _ in varied:
            every_sdk()

    def stub(chain: Any, opts: Any) -> Callable[[], Any]:
        return lambda: chain.request(object, opts)

    every_stub = cycling([stub(hooked, captured_options(client, m)) for m in varied])

    lib: Arms = {"plain": (bare, stub(plain, options))}
    gc.collect()

    print(f"library only: {long_n:,} calls in one guard ...", flush=True)
    old_guard, old = entered()
    fast = rounds_of(lib_n, {**lib, "fast": (bare, stub(hooked, options))}, rng)
    run = rounds_of(long_n, {**lib, "guarded": (old, stub(hooked, options))}, rng)
    old_calls = old_guard.usage.calls
    new_guard_, new = entered()
    every_guard_, every = entered(every_guard)
    now = rounds_of(
        lib_n,
        {
            **lib,
            "new": (new, stub(hooked, options)),
            "old": (old, stub(hooked, options)),
            "every": (every, every_stub),
        },
        rng,
    )
    leave(new_guard_, new)
    leave(every_guard_, every)
    history_guard, history = entered()
    history_n = max(200, lib_n // 10)
    sizes = rounds_of(
        history_n,
        {
            "plain": (bare, stub(plain, options)),
            "short": (history, stub(hooked, options)),
            "long_plain": (bare, stub(plain, long_options)),
            "long": (history, stub(hooked, long_options)),
        },
        rng,
    )
    leave(history_guard, history)

    sdk_guard, sdk_new = entered()
    sdk_every_guard, sdk_every = entered(every_guard)
    swept_guard, sdk_swept = entered()  # a guard of its own: "new" stays at its calls 1-N
    old_from = old_guard.usage.calls + 1
    sdk_arms: Arms = {
        "unpatched": (bare, raw),
        "unpatched2": (bare, raw),
        "fast": (bare, call),
        "new": (sdk_new, call),
        "old": (old, call),
        "every": (sdk_every, every_sdk),
        "unpatched_swept": (bare, raw),
        "new_swept": (sdk_swept, call),
        "minimal": minimal,
        "minimal_swept": minimal,
    }
    print(f"whole SDK calls: {sdk_n:,} rounds of {len(sdk_arms)} ...", flush=True)
    swept = frozenset({"unpatched_swept", "new_swept", "minimal_swept"})
    sdk = rounds_of(sdk_n, sdk_arms, rng, fake, swept)
    assert yardstick.calls == 2 * sdk_n and not yardstick.held_calls, "the yardstick did not run"
    leave(sdk_guard, sdk_new)
    leave(sdk_every_guard, sdk_every)
    leave(swept_guard, sdk_swept)
    leave(old_guard, old)

    unpatched, guarded = median_us(sdk["unpatched"]), median_us(sdk["new"])
    print()
    print("Whole SDK call: openai chat.completions.create, in-memory transport")
    row("unpatched call, median", unpatched, "µs", "10.1f")
    if fresh_us is not None:
        row("same, fresh never-instrumented process (unpaired)", fresh_us, "µs", "10.1f")
    row("noise floor: unpatched - unpatched", paired(sdk, "unpatched2", "unpatched"), "µs")
    row("(a) added outside any guard (fast path)", paired(sdk, "fast", "unpatched"))
    print("  (b) added inside a guard with all five ceilings set:")
    row(f"    new guard, its calls 1-{sdk_n:,}", paired(sdk, "new", "unpatched"))
    old_to = old_from + sdk_n - 1
    row(f"    old guard, its calls {old_from:,}-{old_to:,}", paired(sdk, "old", "unpatched"))
    row("  (c) added inside a guard with every guard set", paired(sdk, "every", "unpatched"))
    print("  (d) caches swept before each call, as an agent's own work would:")
    row("    unpatched call, median", median_us(sdk["unpatched_swept"]), "µs", "10.1f")
    row("    added by the five ceilings", paired(sdk, "new_swept", "unpatched_swept"))
    print("  (e) yardstick: one hook doing only the five ceilings' bare work (minimal_guard.py):")
    row("    added, warm", paired(sdk, "minimal", "unpatched"))
    row("    added, caches swept", paired(sdk, "minimal_swept", "unpatched_swept"))
    row("guarded call (new guard), median", guarded, "µs", "10.1f")
    row("ratio guarded / unpatched", guarded / unpatched, "", "10.3f")

    print()
    print("Library only: RunGuard's hooks around a stub of the SDK call chain, hot loop")
    hooks = [name for name, attr in vars(Hooked).items() if hasattr(attr, "runguard_hook")]
    print(f"  hooked as on this openai: {', '.join(hooks)}")
    row("(a) fast path, no guard active", paired(fast, "fast", "plain"))
    print("  (b) guarded, along one run (each window at its own moment):")
    for target in (10, 1_000, 10_000, LONG_RUN):
        if target <= long_n:
            lo = max(0, min(target - 11, long_n - 21))
            row(f"    calls {lo + 1:,}-{lo + 21:,}", paired(run, "guarded", "plain", lo, lo + 21))
    print(f"  (b) at the same moment, {lib_n:,} rounds:")
    at_new, at_old = paired(now, "new", "plain"), paired(now, "old", "plain")
    row(f"    new guard, its calls 1-{lib_n:,}", at_new)
    row(f"    old guard, its calls {old_calls + 1:,}-{old_calls + lib_n:,}", at_old)
    row("    ratio old / new", at_old / at_new, "", "10.3f")
    row("  (c) every guard set, its calls 1-" + f"{lib_n:,}", paired(now, "every", "plain"))
    print(f"  (b) by history sent, {history_n:,} rounds:")
    row(f"    {len(MESSAGES)} messages", paired(sizes, "short", "plain"))
    row(
        f"    {len(long_history)} messages (50 tool round trips)",
        paired(sizes, "long", "long_plain"),
    )
    print()
    print("Price lookup for one (provider, model)")
    row("genai-prices calc_price, each time", price_lookup_us(raw=True), "µs", "10.2f")
    row("runguard, cached after the first", price_lookup_us(raw=False), "µs", "10.2f")
    print()
    print("Bar (issue): at most 15 µs added per non-streaming call, flat over the run.")
    return 0


def price_lookup_us(raw: bool, n: int = 2_000) -> float:
    """Median µs of one price lookup, in batches of 100."""
    from genai_prices import Usage, calc_price

    from runguard.pricing import rates_for

    usage = Usage(input_tokens=1, output_tokens=1)

    def lookup() -> object:
        if raw:
            return calc_price(usage, MODEL, provider_id="openai")
        return rates_for("openai", MODEL)

    lookup()
    batches = []
    for _ in range(max(1, n // 100)):
        started = time.perf_counter_ns()
        for _ in range(100):
            lookup()
        batches.append((time.perf_counter_ns() - started) / 100 / 1000)
    return statistics.median(batches)


if __name__ == "__main__":
    sys.exit(main())
