"""The benchmarks, run as a user runs them (quick settings): they work, and say what they measured.

Both run in every leg of the SDK version matrix, so they keep working on every
supported openai release, hooked per attempt or per answer.
"""

from __future__ import annotations

import contextvars
import importlib.util
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from openai import _base_client

from _subprocess import ROOT, run
from runguard.testing import FakeProvider, Reply


def test_overhead_benchmark_runs_on_the_installed_openai() -> None:
    done = run("benchmarks/overhead.py", "--quick", timeout=110)
    assert done.returncode == 0, done.stderr
    for line in (
        "fast path",
        "new guard",
        "old guard",
        "caches swept before each call",
        "added by the five ceilings",
        "yardstick: one hook doing only the five ceilings' bare work",
        "ratio guarded / unpatched",
    ):
        assert line in done.stdout
    # the hot loop wraps the stub in the hooks RunGuard installed on this SDK release
    hooked = re.search(r"hooked as on this openai: (.*)$", done.stdout, re.MULTILINE)
    assert hooked, done.stdout
    expected = {"request", "_process_response_data"}
    expected |= (
        {"_send_request"}
        if "_send_request" in vars(_base_client.SyncAPIClient)
        else {"_build_request", "_process_response"}
    )
    assert set(hooked.group(1).split(", ")) == expected


def test_concurrency_benchmark_sends_exactly_the_ceiling() -> None:
    done = run("benchmarks/concurrency.py", "--quick")
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    limit = re.search(r"RunGuard\(max_calls=(\d+)\)", out)
    assert limit, out
    rows = re.findall(
        r"^\d+ (threads|asyncio tasks)\s+(stop|retry)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s",
        out,
        re.MULTILINE,
    )
    assert {(kind, policy) for kind, policy, *_ in rows} == {
        ("threads", "stop"),
        ("threads", "retry"),
        ("asyncio tasks", "stop"),
        ("asyncio tasks", "retry"),
    }
    for _, _, attempts, refused, wire, calls in rows:
        assert int(wire) == int(calls) == int(limit.group(1))
        assert int(attempts) == int(wire) + int(refused)


def _load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_yardstick_does_the_work_it_is_timed_for() -> None:
    # overhead.py's yardstick (row e) must check and charge, or its figure means nothing
    yardstick = _load("benchmarks/minimal_guard.py")
    fake = FakeProvider(default=Reply(text="ok", input_tokens=50, output_tokens=7))
    client = fake.openai()
    yardstick.install(client, type(client).request)
    ceilings = yardstick.Ceilings("gpt-4o", max_calls=2)
    ctx = contextvars.copy_context()
    ctx.run(yardstick.active.set, ceilings)

    def ask() -> Any:
        return client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=10
        )

    ctx.run(ask)
    ctx.run(ask)
    with pytest.raises(yardstick.Refused):
        ctx.run(ask)
    assert fake.wire_count == 2
    assert (ceilings.calls, ceilings.fed, ceilings.made, ceilings.held_calls) == (2, 100, 14, 0)
    ask()  # outside its context the hook lets calls through
    assert fake.wire_count == 3 and ceilings.calls == 2


#: benchmarks/instructions.py (stdlib imports only at its top level)
instructions = _load("benchmarks/instructions.py")


@pytest.mark.parametrize("arm", instructions.ARMS + instructions.SDK_ARMS)
def test_instruction_benchmark_arm_runs_on_the_installed_openai(arm: str) -> None:
    # what callgrind runs for each arm; a guard that tripped would end it with an error
    done = run("benchmarks/instructions.py", "--arm", arm, "3")
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_callgrind_counts_more_of_both_for_more_work() -> None:
    callgrind = instructions.callgrind
    # a list of 200,000 ints spans far more memory than the modelled 1 MiB cache
    idle = callgrind([sys.executable, "-S", "-c", "pass"], cache=True)
    busy = callgrind([sys.executable, "-S", "-c", "sum(list(range(200_000)))"], cache=True)
    assert 0 < idle[0] < busy[0] - 1_000_000
    assert 0 < idle[1] < busy[1] - 10_000
    assert callgrind([sys.executable, "-S", "-c", "pass"], cache=False)[1] == 0
