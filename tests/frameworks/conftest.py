"""Shared pieces of the framework integration tests (``make test-frameworks``).

These tests run real framework packages (LangChain, LangGraph, the OpenAI Agents
SDK, LiteLLM) over :class:`runguard.testing.FakeProvider`. They live in their
own virtualenv, ``.venv-frameworks``, built from the ``frameworks-test`` extra:
LiteLLM must not be installed next to MLflow (MLflow's judges switch to it).

In the main virtualenv the packages are absent and every module here skips
itself (``pytest.importorskip``). ``make test-frameworks`` sets
``RUNGUARD_FRAMEWORKS=1``, which turns a missing or broken package into an
error instead, so a skip can never hide a failure there.
"""

from __future__ import annotations

import importlib
import os
import traceback

import pytest

#: every package these tests import, by import name
REQUIRED = (
    "httpx",
    "langchain_core",
    "langchain_openai",
    "langchain_anthropic",
    "langgraph",
    "agents",
    "litellm",
)

if os.environ.get("RUNGUARD_FRAMEWORKS") == "1":
    _broken = []
    for _name in REQUIRED:
        try:
            importlib.import_module(_name)
        except Exception:
            _broken.append(f"{_name}:\n{traceback.format_exc(limit=2)}")
    if _broken:
        raise pytest.UsageError(
            "RUNGUARD_FRAMEWORKS=1 but these framework packages do not import "
            "(make test-frameworks installs them):\n" + "\n".join(_broken)
        )
