"""RunGuard's per-call cost in CPU instructions and cache lines, which a busy machine does not blur.

Run ``python benchmarks/instructions.py`` (a few minutes; needs ``valgrind``).

Wall-clock figures on a shared machine swing by a third from hour to hour
(``benchmarks/overhead.py``). ``valgrind --tool=callgrind`` counts the
instructions a process executes instead, and that count is the same from run
to run whatever else the machine does. Each arm below runs the hot loop of
``overhead.py`` (RunGuard's hooks around a stub of the SDK's call chain, with
the request options the real SDK builds) for N and for 3N calls in two fresh
processes under callgrind; the difference divided by 2N is what one call
costs, with start-up and warm-up cancelled out.

Arms: the stub alone (``plain``), hooked with no guard active (``fast``),
inside a guard with the five ceilings (``five``), and inside a guard with
every guard set (``every``, cycling requests so no loop guard trips).

With ``--in-situ`` it also counts whole SDK calls, 25 and 75 of them by default (``sdk-*``
arms, about 25 minutes more on two cores):
``openai`` ``chat.completions.create`` over FakeProvider's in-memory transport, on a client
whose hooked methods are shadowed by the SDK's originals (``sdk-bare``, as if RunGuard were
not installed), and on an instrumented client outside any guard, with the five ceilings and
with every guard; and, for comparison, on the unhooked client with only the one hook of
``minimal_guard.py`` (``sdk-minimal``, about the least a guard in Python adds). RunGuard
adds about what it adds in the hot loop there; a whole call's count varies by up to 15,000
instructions from run to run (the SDK's own work does).

Instructions are not time, least of all inside a real SDK call. Between two
calls the SDK's own work (and, in an agent, everything else it does) pushes
RunGuard's code and data out of the CPU's per-core cache, so inside a real
call most of what RunGuard pays is waiting for memory. The in-situ arms
therefore also run callgrind's cache model with a last-level cache of 1 MiB,
the size of one core's L2 cache on this machine, and print the cache lines
each call fetched from beyond it. On this machine each such line costs
roughly 50-70 ns (a third-level cache hit, or main memory), which is why
1 % more instructions can make the call 5 % slower. The count includes lines
the SDK fetches again because RunGuard's own lines pushed them out of the
cache (about two thirds of it in one diagnostic run). Address randomisation is
turned off for these runs where the system allows (``setarch -R``): it moves
objects between cache sets, and with it the line counts of one arm varied by a
few hundred a call from run to run. Fewer distinct objects,
functions and bytecode touched per call lower this count; fewer instructions
alone may not. Use the figures to compare versions of RunGuard, and
``overhead.py`` for microseconds.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import itertools
import os
import platform
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ARMS = ("plain", "fast", "five", "every")
SDK_ARMS = ("sdk-bare", "sdk-fast", "sdk-five", "sdk-every", "sdk-minimal")


def run_arm(arm: str, calls: int) -> None:
    """Inside callgrind: warm up, then make ``calls`` calls of ``arm``."""
    sys.path.insert(0, str(Path(__file__).parent))
    import overhead as bench

    from runguard.testing import FakeProvider

    fake = FakeProvider(default=bench.REPLY)
    client = fake.openai()
    with bench.new_guard():  # instruments the SDK, warms prices and token counts
        for _ in range(50):
            bench.sdk_call(client)()
    if arm.startswith("sdk-"):
        run_sdk_arm(bench, fake, client, arm, calls)
        return
    chain_class, hooked_class = bench.stub_chain()
    chain = chain_class() if arm == "plain" else hooked_class()
    histories = bench.variants() if arm == "every" else [bench.MESSAGES]
    options = [bench.captured_options(client, messages) for messages in histories]
    if arm in ("five", "every"):
        _, ctx = bench.entered(bench.every_guard if arm == "every" else None)
    else:
        ctx = contextvars.copy_context()

    def loop(n: int) -> None:
        turn = itertools.cycle(options)
        for _ in range(n):
            chain.request(object, next(turn))

    ctx.run(loop, 2 * len(options))  # fill the loop windows before counting
    ctx.run(loop, calls)


def run_sdk_arm(bench: Any, fake: Any, client: Any, arm: str, calls: int) -> None:
    """Inside callgrind: ``calls`` whole SDK calls of ``arm`` (see the module's docstring)."""
    ctx = contextvars.copy_context()
    if arm == "sdk-every":
        call = bench.cycling([bench.sdk_call(client, m) for m in bench.variants()])
    elif arm == "sdk-minimal":  # overhead.py's yardstick: a client with minimal_guard's hook
        _, (ctx, call) = bench.minimal_client(fake)
    else:
        call = bench.sdk_call(bench.unpatched_client(fake) if arm == "sdk-bare" else client)
    if arm in ("sdk-five", "sdk-every"):
        _, ctx = bench.entered(bench.every_guard if arm == "sdk-every" else None)

    def loop(n: int) -> None:
        for _ in range(n):
            call()
            fake.requests.clear()

    ctx.run(loop, 2 * len(bench.variants()))
    ctx.run(loop, calls)


#: callgrind's cache model for whole SDK calls: a last-level cache the size of one core's L2 here
L2_MODEL = ("--cache-sim=yes", "--LL=1048576,16,64")


@functools.cache
def fixed_layout() -> tuple[str, ...]:
    """A prefix that turns address randomisation off, where the system allows it.

    Where objects land decides which of them compete for a cache set, so with
    randomisation on, the modelled cache lines of one arm vary by a few hundred
    a call from run to run; with it off they repeat.
    """
    prefix = ("setarch", platform.machine(), "-R")
    if shutil.which("setarch") is None:
        return ()
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else ()


def instructions(arm: str, calls: int) -> tuple[int, int]:
    """Instructions executed, and cache lines fetched from beyond L2 (0 for hot-loop arms)."""
    return callgrind(
        [sys.executable, __file__, "--arm", arm, str(calls)], cache=arm.startswith("sdk-")
    )


def callgrind(command: list[str], cache: bool) -> tuple[int, int]:
    """Run ``command`` under callgrind: (instructions, lines fetched beyond L2 if ``cache``)."""
    model = L2_MODEL if cache else ()
    valgrind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *model]
    done = subprocess.run(
        [*fixed_layout(), *valgrind, *command],
        capture_output=True,
        text=True,
        check=False,
        # a fixed string hash: dict and set probes, and so the counts, repeat from run to run
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    lines = re.search(r"LL misses:\s+([\d,]+)", done.stderr) if cache else None
    if done.returncode != 0 or found is None or (cache and lines is None):
        raise RuntimeError(f"callgrind failed for {command}:\n{done.stderr[-2000:]}")
    return int(found.group(1)), int(lines.group(1).replace(",", "")) if lines else 0


def per_call(arms: tuple[str, ...], n: int) -> dict[str, tuple[float, float]]:
    """(instructions, L2 lines) per call of each arm: (count at 3n - count at n) / 2n."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        runs = {(arm, k): pool.submit(instructions, arm, k) for arm in arms for k in (n, 3 * n)}
        found = {key: run.result() for key, run in runs.items()}
    return {
        arm: (
            (found[arm, 3 * n][0] - found[arm, n][0]) / (2 * n),
            (found[arm, 3 * n][1] - found[arm, n][1]) / (2 * n),
        )
        for arm in arms
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="N (default 1000)")
    parser.add_argument(
        "--in-situ", action="store_true", help="also count whole SDK calls (about 25 minutes more)"
    )
    parser.add_argument(
        "--sdk-calls", type=int, default=25, help="N for whole SDK calls (default 25)"
    )
    parser.add_argument("--arm", nargs=2, metavar=("ARM", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        run_arm(args.arm[0], int(args.arm[1]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 1
    n = args.calls
    print(f"Python {sys.version.split()[0]}: instructions per call, from {n:,} and {3 * n:,} calls")
    print("RunGuard's hooks around the stub SDK chain (hot loop):")
    counted = {arm: ir for arm, (ir, _) in per_call(ARMS, n).items()}
    for arm in ARMS:
        added = counted[arm] - counted["plain"]
        note = "" if arm == "plain" else f"   RunGuard adds {added:>9,.0f}"
        print(f"  {arm:<9} {counted[arm]:>12,.0f}{note}")
    if args.in_situ:
        sdk_n = args.sdk_calls
        print(f"Whole openai chat.completions.create calls, from {sdk_n:,} and {3 * sdk_n:,}:")
        print(f"  {'':<11} {'instructions':>12}  {'L2 lines':>8}")
        whole = per_call(SDK_ARMS, sdk_n)
        bare, bare_lines = whole["sdk-bare"]
        for arm in SDK_ARMS:
            ir, lines = whole[arm]
            added, more = ir - bare, lines - bare_lines
            who = "yardstick" if arm == "sdk-minimal" else "RunGuard"
            share = f"{who:>12} adds {added:>9,.0f} ({added / bare:.2%}) and {more:>6,.0f} lines"
            note = "" if arm == "sdk-bare" else f"{share} ({more / bare_lines:.0%})"
            print(f"  {arm:<11} {ir:>12,.0f}  {lines:>8,.0f}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
