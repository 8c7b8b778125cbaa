"""The benchmarks, run as a user runs them (quick settings): they work, and say what they measured.

Both run in every leg of the SDK version matrix, so they keep working on every
supported openai release, hooked per attempt or per answer.
"""

from __future__ import annotations

import re

from openai import _base_client

from _subprocess import run


def test_overhead_benchmark_runs_on_the_installed_openai() -> None:
    done = run("benchmarks/overhead.py", "--quick", timeout=110)
    assert done.returncode == 0, done.stderr
    for line in ("fast path", "new guard", "old guard", "ratio guarded / unpatched"):
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
