"""An SDK whose private hooks moved makes RunGuard fail loudly, never count silently wrong.

Each test writes a deliberately broken stand-in named ``openai`` or
``anthropic`` (shaped like a Stainless SDK, minus one hook point) into a
temporary directory, and runs a fresh interpreter with that directory first
on ``sys.path``: the real SDKs are shadowed and nothing is installed. The
stand-in counts the requests its client sends, so the tests can check that
no call got through while RunGuard was refusing to run.

``tests/test_openai.py`` covers ``_stainless.patch`` on a stand-in under a
private name; these go through the public entry points (entering a
``RunGuard``, :func:`runguard.instrument`) with the SDK's real import name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _stand_in import ATTEMPT, write_stand_in

# (sdk, class, method) the stand-in lacks
BROKEN = [
    ("openai", "SyncAPIClient", "_send_request"),
    ("openai", "AsyncAPIClient", "_send_request"),
    ("openai", "SyncAPIClient", "request"),
    ("openai", "BaseClient", "_process_response_data"),
    ("anthropic", "SyncAPIClient", "_attempt_request"),
    ("anthropic", "AsyncAPIClient", "request"),
]

# Runs in the fresh interpreter; prints one JSON line of what happened.
SCRIPT = """
import json, sys

import runguard
from runguard import RunGuard

ORDER = sys.argv[1]
SDK = sys.argv[2]
seen = {"errors": [], "body_ran": False}


def attempt(action):
    try:
        action()
    except runguard.InstrumentationError as error:
        seen["errors"].append(str(error))


def guarded_call():
    sdk = __import__(SDK)
    with RunGuard(max_calls=1):
        seen["body_ran"] = True
        sdk._base_client.SyncAPIClient().request(None, {"url": "/v1/chat/completions"})


if ORDER == "imported-first":
    __import__(SDK)
    attempt(guarded_call)
    attempt(guarded_call)  # a second guard is refused too, not let through
elif ORDER == "guard-first":
    def import_inside_guard():
        with RunGuard(max_calls=1):
            __import__(SDK)
            seen["body_ran"] = True
    attempt(import_inside_guard)
elif ORDER == "instrument-first":
    attempt(runguard.instrument)
    attempt(lambda: __import__(SDK))  # refused by the post-import hook
    attempt(lambda: __import__(SDK))  # the caller tries again
    attempt(guarded_call)

base = sys.modules.get(SDK + "._base_client")
seen["sent"] = len(base.SENT) if base is not None else 0
seen["patched"] = bool(getattr(base, "_runguard_patched", False))
seen["hooked"] = sorted(
    f"{cls}.{name}"
    for cls in ("BaseClient", "SyncAPIClient", "AsyncAPIClient")
    for name, value in vars(getattr(base, cls, object)).items()
    if hasattr(value, "runguard_hook")
)
print(json.dumps(seen))
"""


def run_stand_in(
    tmp_path: Path, sdk: str, order: str, *missing: tuple[str, str], answers: bool = False
) -> dict[str, object]:
    """Run SCRIPT over a stand-in that lacks the ``missing`` (class, method) pairs."""
    write_stand_in(tmp_path, sdk, ATTEMPT[sdk], *missing, answers=answers)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, order, sdk],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    seen: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return seen


def refusals(seen: dict[str, object], sdk: str, cls: str, method: str) -> list[str]:
    """The run's refusals, each naming the missing hook; nothing ran or was sent meanwhile."""
    errors = seen["errors"]
    assert isinstance(errors, list)
    for message in errors:
        assert f"{sdk}._base_client.{cls}.{method}" in message
    assert seen["body_ran"] is False
    assert seen["sent"] == 0
    return errors


@pytest.mark.parametrize(("sdk", "cls", "method"), BROKEN)
def test_entering_a_guard_refuses_an_sdk_already_imported(
    tmp_path: Path, sdk: str, cls: str, method: str
) -> None:
    seen = run_stand_in(tmp_path, sdk, "imported-first", (cls, method))
    errors = refusals(seen, sdk, cls, method)
    assert len(errors) == 2, "each guard entry must refuse, not only the first"
    for message in errors:
        assert f"{sdk} 0.0.0-moved" in message
    assert seen["patched"] is False


@pytest.mark.parametrize(("sdk", "cls", "method"), BROKEN[:1] + BROKEN[4:5])
def test_importing_the_sdk_inside_a_guard_refuses_it(
    tmp_path: Path, sdk: str, cls: str, method: str
) -> None:
    seen = run_stand_in(tmp_path, sdk, "guard-first", (cls, method))
    assert len(refusals(seen, sdk, cls, method)) == 1


@pytest.mark.parametrize(("sdk", "cls", "method"), BROKEN[:1] + BROKEN[4:5])
def test_instrument_before_import_refuses_the_sdk_at_import_and_after(
    tmp_path: Path, sdk: str, cls: str, method: str
) -> None:
    seen = run_stand_in(tmp_path, sdk, "instrument-first", (cls, method))
    errors = refusals(seen, sdk, cls, method)
    assert len(errors) >= 2, "only the first import refused the broken SDK"
    assert seen["patched"] is False


# An SDK older than the per-attempt method (openai before 2.31, anthropic before 0.108) is
# hooked on the methods each answer passes through instead; the matrix's oldest leg drives
# real ones. Here: the choice between the two, and the refusal when neither is whole.
ANSWER_HOOKS = [
    "AsyncAPIClient._process_response",
    "BaseClient._build_request",
    "BaseClient._make_status_error_from_response",
    "BaseClient._should_retry",
    "SyncAPIClient._process_response",
]


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_an_sdk_without_the_per_attempt_method_is_hooked_on_its_answers(
    tmp_path: Path, sdk: str
) -> None:
    seen = run_stand_in(
        tmp_path,
        sdk,
        "imported-first",
        ("SyncAPIClient", ATTEMPT[sdk]),
        ("AsyncAPIClient", ATTEMPT[sdk]),
        answers=True,
    )
    assert seen["errors"] == []
    assert seen["body_ran"] is True
    assert seen["sent"] == 2  # each guard let its call through to the stand-in's wire
    assert seen["patched"] is True
    hooked = seen["hooked"]
    assert isinstance(hooked, list)
    assert set(ANSWER_HOOKS) <= set(hooked)
    assert f"AsyncAPIClient.{ATTEMPT[sdk]}" not in hooked  # one way or the other, not both


@pytest.mark.parametrize("lacking", ANSWER_HOOKS)
def test_an_sdk_with_neither_whole_hook_set_is_refused(tmp_path: Path, lacking: str) -> None:
    cls, method = lacking.split(".")
    seen = run_stand_in(
        tmp_path,
        "openai",
        "imported-first",
        ("SyncAPIClient", "_send_request"),
        (cls, method),
        answers=True,
    )
    assert len(refusals(seen, "openai", "SyncAPIClient", "_send_request")) == 2
    assert seen["patched"] is False
