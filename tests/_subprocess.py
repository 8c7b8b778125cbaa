"""Running the project's scripts as a user runs them: in a subprocess, from the checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # src first on the path, so the checkout is tested even without an editable install
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def number(label: str, text: str) -> int:
    """The integer on the line ``label  1,234`` (or ``label: 1234``)."""
    match = re.search(rf"^\s*{re.escape(label)}:?\s+([\d,]+)\s*$", text, re.MULTILINE)
    assert match, f"no line {label!r} in:\n{text}"
    return int(match.group(1).replace(",", ""))
