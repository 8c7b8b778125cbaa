"""``import runguard`` is cheap: no SDK, tokenizer, price catalogue or backend is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ["openai", "anthropic", "mlflow", "redis", "tiktoken", "genai_prices"]

PROBE = textwrap.dedent(
    """
    import json, sys

    HEAVY = {heavy!r}

    def loaded():
        return sorted(
            name for name in HEAVY
            if any(m == name or m.startswith(name + ".") for m in sys.modules)
        )

    report = {{"start": loaded()}}
    import runguard
    report["import"] = loaded()
    report["runguard"] = "runguard" in sys.modules
    runguard.instrument()
    report["instrument"] = loaded()
    with runguard.RunGuard(max_calls=1, max_cost_usd=1.0, name="probe"):
        report["guard"] = loaded()
    {extra}
    print(json.dumps(report))
    """
)


def probe(extra: str = "") -> dict:
    code = PROBE.format(heavy=HEAVY, extra=extra.strip())
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_and_instrument_load_no_heavy_module() -> None:
    report = probe(
        # control: the detector does see a heavy module once it is imported
        "import tiktoken; report['control'] = loaded()"
    )
    assert report["start"] == []
    assert report["runguard"] is True
    assert report["import"] == []
    assert report["instrument"] == []
    assert report["guard"] == []
    assert report["control"] == ["tiktoken"]


def test_instrument_hooks_an_sdk_when_it_is_imported_later() -> None:
    report = probe(
        "import openai, openai._base_client as base; "
        "report['patched'] = bool(getattr(base, '_runguard_patched', False))"
    )
    assert report["instrument"] == []
    assert report["patched"] is True
