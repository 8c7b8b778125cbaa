"""The framework examples run offline, in this (the frameworks) virtualenv's Python.

They are not in tests/test_cli_and_examples.py: the main virtualenv has no
framework packages. Each runs as a subprocess, as a user would run it, and
must print a trip and as many requests on the wire as calls admitted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_openai")
pytest.importorskip("langgraph")
pytest.importorskip("agents")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("script", "limit"), [("langchain_agent.py", 6), ("openai_agents_loop.py", 8)]
)
def test_example_stops_at_its_bar(script: str, limit: int) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert (
        f"max_calls tripped: this openai call to gpt-4o-mini would bring calls to {limit + 1}"
        in out
    )
    admitted = re.search(r"^calls admitted: (\d+)$", out, re.M)
    wire = re.search(r"^requests that reached the provider: (\d+)$", out, re.M)
    assert admitted and wire, out
    assert int(admitted.group(1)) == int(wire.group(1)) == limit
