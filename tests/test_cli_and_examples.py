"""The command line and the examples, run as a user runs them: in a subprocess.

Expected numbers come from each run's own output (the wire count must equal the
calls the guard admitted), not from constants that would drift with the demo.
"""

from __future__ import annotations

import re

from _subprocess import number, run
from runguard._cli import main


def value(label: str, text: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}\s+(\S.*)$", text, re.MULTILINE)
    assert match, f"no line {label!r} in:\n{text}"
    return match.group(1).strip()


def test_demo_trips_and_the_refused_call_never_reaches_the_wire() -> None:
    done = run("-m", "runguard", "demo")
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    calls = number("calls", out)
    assert calls > 0
    assert number("requests that reached the wire", out) == calls
    assert number("calls the guard admitted", out) == calls
    # one printed step per admitted call, then the refusal of the next one
    assert out.count("model asks for search_orders") == calls
    assert f"step {calls + 1:>2}  refused before sending: raised BudgetExceeded" in out
    assert value("refused call", out) == f"step {calls + 1}, never sent"

    guard = value("guard", out)
    assert guard in ("max_calls", "max_cost_usd")
    limit = float(value("limit", out).lstrip("$").replace(",", ""))
    observed = float(value("observed", out).lstrip("$").replace(",", ""))
    assert observed > limit
    assert "over the limit" in value("reason", out)
    for label in ("input tokens", "output tokens", "cached input tokens", "estimated calls"):
        number(label, out)
    assert value("cost", out).startswith("$")
    float(value("LLM seconds", out))


def test_demo_needs_only_the_openai_sdk() -> None:
    # `make demo` installs runguard[openai] and nothing else.
    code = (
        "import sys\n"
        "from runguard._cli import main\n"
        "assert main(['demo']) == 0\n"
        "print(sorted(m for m in ('anthropic', 'mlflow') if m in sys.modules))\n"
    )
    done = run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_help_and_usage_errors() -> None:
    done = run("-m", "runguard", "--help")
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout and done.stdout.startswith("usage: runguard")

    done = run("-m", "runguard", "no-such-command")
    assert done.returncode == 2
    assert "usage: runguard" in done.stderr and "invalid choice" in done.stderr

    assert run("-m", "runguard").returncode == 2


def test_main_returns_exit_codes_instead_of_exiting() -> None:
    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
    assert main([]) == 2


def test_react_example_is_stopped_by_its_guard() -> None:
    done = run("examples/react_loop.py")
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert "stopped: RunGuard 'order-agent'" in out

    trip = re.search(r"^trip: guard=(\w+) limit=([\d.]+) observed=([\d.]+)$", out, re.MULTILINE)
    assert trip, out
    assert float(trip.group(3)) > float(trip.group(2))
    calls = number("calls admitted", out)
    assert calls > 0
    assert number("requests that reached the provider", out) == calls
    assert out.count("  tool ") == calls  # every admitted call asked for a tool


def test_retry_storm_example_sends_five_requests() -> None:
    done = run("examples/retry_storm.py")
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert "stopped: RunGuard 'ticket-summaries'" in out
    # the fake answers every request 429, so every request on the wire was one
    assert number("requests that reached the provider", out) == 5
    assert number("429 answers", out) == 5
    assert "429" not in out.split("stopped: ", 1)[1].splitlines()[0]  # message defused


def test_tool_loop_example_is_stopped_after_the_third_repeat() -> None:
    done = run("examples/tool_loop.py")
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert "stopped: RunGuard 'billing-agent'" in out
    repeated = re.findall(r"^  tool lookup_invoice\(", out, re.MULTILINE)
    assert len(repeated) == 3
    calls = number("calls admitted", out)
    assert number("requests that reached the provider", out) == calls == 4


def test_support_bot_example_alerts_then_refuses_at_its_daily_budget() -> None:
    done = run("examples/support_bot.py")
    out = done.stdout
    assert done.returncode == 0, done.stderr
    assert "budget:daily tripped" in out and "resets at" in out
    assert re.search(r"^alert: daily-alert at \$", out, re.MULTILINE)
    assert "most expensive step:" in out
    for name in ("retrieval", "routing", "refund-agent", "synthesis", "guardrail"):
        assert re.search(rf"^{name}\s+\d+", out, re.MULTILINE), name
    calls = re.search(r"^RunGuard 'support-bot': (\d+) calls", out, re.MULTILINE)
    assert calls, out
    assert number("requests that reached the provider", out) == int(calls.group(1))


def test_eval_fanout_example_fits_the_evaluation_to_its_call_budget() -> None:
    done = run("examples/eval_fanout.py", timeout=120)
    out = done.stdout
    assert done.returncode == 0, done.stderr
    limit = number("max_llm_calls", out)
    assert number("expected LLM calls", out) > limit  # the whole evaluation would not fit

    # on_over_budget="raise": refused before the first request
    assert "on_over_budget='raise': BudgetExceeded: " in out
    assert number("requests sent by the refused evaluation", out) == 0

    # the default: a sample that fits, every call counted, agent's and judges' alike
    rows, kept = number("rows total", out), number("rows kept", out)
    assert number("rows", out) == rows
    assert 0 < kept < rows
    assert number("rows that fit", out) == kept
    assert number("rows scored", out) == kept
    assert value("tripped:", out) == "no"
    admitted = number("calls RunGuard admitted", out)
    agent = number("agent requests that reached the provider", out)
    judges = number("judge requests that reached the judge", out)
    assert agent >= kept and judges >= kept
    assert agent + judges == admitted <= limit
    assert admitted == number("expected LLM calls for those rows", out)

    # the summary logged on the evaluation's run, read back from MLflow
    assert number("runguard.eval.calls", out) == admitted
    assert number("runguard.eval.rows_total", out) == rows
    assert number("runguard.eval.rows_kept", out) == kept
    assert number("runguard.eval.rows_scored", out) == kept
    assert value("runguard.eval.sampled:", out) == "true"
    assert value("runguard.eval.tripped:", out) == "false"


def test_mlflow_tracking_example_leaves_trip_usage_and_one_held_artifact_on_the_run() -> None:
    done = run("examples/mlflow_tracking.py", timeout=120)
    out = done.stdout
    assert done.returncode == 0, done.stderr
    key = "runguard.support-bot."
    assert value(f"{key}tripped:", out) == "true"
    guard = value(f"{key}trip_guard:", out)
    assert value(f"{key}trip_reason:", out) == value(f"stopped by {guard}:", out)

    calls = number("calls admitted", out)
    assert calls > 0
    assert number("requests that reached the provider", out) == calls
    assert number(f"{key}calls", out) == calls
    steps = re.findall(r"^  step \d+: lookup_order -> ", out, re.MULTILINE)
    assert len(steps) == calls  # every admitted call asked for the tool

    # held writes are in artifacts.json, not uploaded one by one; uploads are counted
    listed = re.findall(r"^artifact: (\S+)$", out, re.MULTILINE)
    assert {"runguard/support-bot/ledger.json", "runguard/support-bot/artifacts.json"} <= set(
        listed
    )
    assert not [path for path in listed if path.startswith("transcript/")]
    uploads = [path for path in listed if not path.startswith("runguard/")]
    assert uploads and number(f"{key}artifact_writes", out) == len(uploads)
    assert number("tool_output entries in artifacts.json", out) == len(steps)
    assert number("text entries in artifacts.json", out) == len(steps)

    # mlflow_run="start": a run of the guard's own, named after it and ended
    assert value("run RunGuard started:", out) == "nightly-digest (FINISHED)"
    started_calls = number("its calls metric", out)
    assert started_calls > 0
    assert number("requests that reached the provider, both guards", out) == calls + started_calls
