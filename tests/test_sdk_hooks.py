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
import textwrap
from pathlib import Path

import pytest

BASE_CLIENT = """
SENT = []


class BaseClient:
    def _process_response_data(self, *, data, cast_to, response):
        return data


class SyncAPIClient(BaseClient):
    def request(self, cast_to, options, *, stream=False, stream_cls=None):
        SENT.append(options)  # the stand-in's wire

    def {attempt}(self, *args, **kwargs):
        return None


class AsyncAPIClient(BaseClient):
    async def request(self, cast_to, options, *, stream=False, stream_cls=None):
        SENT.append(options)

    async def {attempt}(self, *args, **kwargs):
        return None
"""

STREAMING = """
class Stream:
    def __stream__(self):
        yield from ()


class AsyncStream:
    async def __stream__(self):
        if False:
            yield None
"""

ATTEMPT = {"openai": "_send_request", "anthropic": "_attempt_request"}

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
print(json.dumps(seen))
"""


def write_stand_in(root: Path, sdk: str, cls: str, method: str) -> None:
    """A package named ``sdk`` with every hook point RunGuard needs but ``cls.method``."""
    package = root / sdk
    package.mkdir()
    (package / "__init__.py").write_text(
        '__version__ = "0.0.0-moved"\nfrom . import _base_client, _streaming\n'
    )
    source = textwrap.dedent(BASE_CLIENT).format(attempt=ATTEMPT[sdk])
    (package / "_base_client.py").write_text(source + _remove(cls, method))
    (package / "_streaming.py").write_text(textwrap.dedent(STREAMING))


def _remove(cls: str, method: str) -> str:
    # deleting after the class bodies keeps the stand-in's source one template
    return f"\n\ndel {cls}.{method}\n"


def run_stand_in(tmp_path: Path, sdk: str, cls: str, method: str, order: str) -> dict[str, object]:
    write_stand_in(tmp_path, sdk, cls, method)
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


@pytest.mark.parametrize(("sdk", "cls", "method"), BROKEN)
def test_entering_a_guard_refuses_an_sdk_already_imported(
    tmp_path: Path, sdk: str, cls: str, method: str
) -> None:
    seen = run_stand_in(tmp_path, sdk, cls, method, "imported-first")
    errors = seen["errors"]
    assert isinstance(errors, list)
    assert len(errors) == 2, "each guard entry must refuse, not only the first"
    for message in errors:
        assert f"{sdk}._base_client.{cls}.{method}" in message
        assert f"{sdk} 0.0.0-moved" in message
    assert seen["body_ran"] is False
    assert seen["sent"] == 0
    assert seen["patched"] is False


@pytest.mark.parametrize(("sdk", "cls", "method"), BROKEN[:1] + BROKEN[4:5])
def test_importing_the_sdk_inside_a_guard_refuses_it(
    tmp_path: Path, sdk: str, cls: str, method: str
) -> None:
    seen = run_stand_in(tmp_path, sdk, cls, method, "guard-first")
    errors = seen["errors"]
    assert isinstance(errors, list)
    assert len(errors) == 1
    assert f"{sdk}._base_client.{cls}.{method}" in errors[0]
    assert seen["body_ran"] is False
    assert seen["sent"] == 0


@pytest.mark.parametrize(("sdk", "cls", "method"), BROKEN[:1] + BROKEN[4:5])
def test_instrument_before_import_refuses_the_sdk_at_import_and_after(
    tmp_path: Path, sdk: str, cls: str, method: str
) -> None:
    seen = run_stand_in(tmp_path, sdk, cls, method, "instrument-first")
    errors = seen["errors"]
    assert isinstance(errors, list)
    assert len(errors) >= 2, "only the first import refused the broken SDK"
    for message in errors:
        assert f"{sdk}._base_client.{cls}.{method}" in message
    assert seen["body_ran"] is False
    assert seen["sent"] == 0
    assert seen["patched"] is False
