"""RunGuard's per-call cost in CPU instructions, which a busy machine does not blur.

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

Instructions are not time: a CPU runs roughly ten thousand of these a
microsecond in this hot loop, fewer when RunGuard's code is cold inside a
real SDK call. Use the figures to compare versions of RunGuard, and
``overhead.py`` for microseconds.
"""

from __future__ import annotations

import argparse
import contextvars
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

ARMS = ("plain", "fast", "five", "every")


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


def instructions(arm: str, calls: int) -> int:
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--arm",
            arm,
            str(calls),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind failed for {arm}:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="N (default 1000)")
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
    per_call = {}
    for arm in ARMS:
        per_call[arm] = (instructions(arm, 3 * n) - instructions(arm, n)) / (2 * n)
        added = per_call[arm] - per_call["plain"]
        note = "" if arm == "plain" else f"   RunGuard adds {added:>9,.0f}"
        print(f"  {arm:<6} {per_call[arm]:>9,.0f}{note}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
