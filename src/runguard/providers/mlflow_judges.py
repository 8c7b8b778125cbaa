"""MLflow's LLM judges: they post to the provider themselves, so RunGuard hooks them here.

MLflow's judges (``mlflow.genai`` scorers, ``make_judge``, and the legacy
``mlflow.metrics.genai`` metrics) do not use the openai or anthropic SDK:
they build a provider request and post it with ``requests``, retrying
rate-limit and server errors in their own loop. Three hooks, installed when
those MLflow modules are imported (never importing them):

- where MLflow picks the judge's provider and model
  (``GatewayAdapter._invoke_and_handle_tools``, ``model_utils._call_llm_provider_api``):
  remembered for the calls below, for pricing and reading;
- where one judge request is sent with its retries (``send_chat_request``,
  ``model_utils._send_request``): one LLM call, admitted by the active
  guards before anything is posted and settled with the usage the provider
  reported;
- ``requests.post`` inside such a call: each HTTP attempt, reported to the
  guards like an SDK attempt (429 storms, budget refusals), and refused
  after a guard stopped the call.

A refusal raises :class:`runguard.GuardTripped` out of the judge; MLflow
records it as that row's failed assessment. Its message never reads as a
rate limit, so MLflow's harness does not retry it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar
from time import perf_counter
from types import ModuleType, SimpleNamespace
from typing import Any

from .._call import Call, start_call
from .._ledger import LEDGER
from .._scope import active_accounts
from . import anthropic as anthropic_reader
from . import openai as openai_reader
from ._http import REFUSAL_STATUSES, attempt_of

#: the provider and model of the judge being invoked in this context
_judge: ContextVar[tuple[str, str] | None] = ContextVar("runguard_judge", default=None)
#: the judge call in flight in this context
_call: ContextVar[Call | None] = ContextVar("runguard_judge_call", default=None)

#: module -> (function or "Class.method", what it does)
_HOOKS: dict[str, tuple[tuple[str, str], ...]] = {
    "mlflow.genai.judges.adapters.gateway_adapter": (
        ("GatewayAdapter._invoke_and_handle_tools", "judge"),
        ("send_chat_request", "call"),
    ),
    "mlflow.metrics.genai.model_utils": (
        ("_call_llm_provider_api", "judge"),
        ("_send_request", "call"),
    ),
}

_registered = False
_posts_hooked = False
_lock = threading.RLock()  # _install may run inside instrument(), module already imported


def instrument() -> None:
    """Hook MLflow's judges when (if ever) their modules are imported. Idempotent."""
    global _registered
    if _registered:
        return
    import wrapt

    with _lock:
        if _registered:
            return
        for module in _HOOKS:
            wrapt.register_post_import_hook(_install, module)
        _registered = True


def _install(module: ModuleType) -> None:
    import requests
    import wrapt

    wrappers = {"judge": _naming_the_judge, "call": _judge_call}
    for target, role in _HOOKS[module.__name__]:
        owner, _, attribute = target.rpartition(".")
        holder = getattr(module, owner) if owner else module
        # feature-detected: a version without this point leaves its judges unseen
        if callable(getattr(holder, attribute, None)):
            wrapt.wrap_function_wrapper(module, target, wrappers[role])
    global _posts_hooked
    with _lock:
        if not _posts_hooked:
            wrapt.wrap_function_wrapper(requests, "post", _attempt)
            _posts_hooked = True


def _naming_the_judge(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # (provider, model, ...) in both: GatewayAdapter._invoke_and_handle_tools and
    # _call_llm_provider_api(provider_name, model, ...)
    provider = args[0] if args else kwargs.get("provider", kwargs.get("provider_name"))
    model = args[1] if len(args) > 1 else kwargs.get("model_name", kwargs.get("model"))
    token = _judge.set((str(provider), str(model)))
    try:
        return wrapped(*args, **kwargs)
    finally:
        _judge.reset(token)


def _judge_call(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    accounts = active_accounts()
    if not accounts:
        return wrapped(*args, **kwargs)
    # send_chat_request(endpoint, headers, payload, num_retries), _send_request(same, no retries)
    payload = args[2] if len(args) > 2 else kwargs.get("payload")
    provider, model = _judge.get() or ("openai", "unknown")
    reader = anthropic_reader if provider == "anthropic" else openai_reader
    body = payload if isinstance(payload, dict) else {}
    path = "/v1/messages" if reader is anthropic_reader else "/chat/completions"
    plan = reader.describe(SimpleNamespace(method="post", url=path, json_data=body))
    model = str(body.get("model") or model)
    call = start_call(
        accounts,
        provider,
        "judge",
        model,
        plan.input_tokens if plan is not None else 0,
        plan.max_output_tokens if plan is not None else None,
        False,
    )
    token = _call.set(call)
    started = perf_counter()
    try:
        answer = wrapped(*args, **kwargs)
    except BaseException:
        call.llm_seconds += perf_counter() - started
        call.finish(failed=True)
        raise
    finally:
        _call.reset(token)
    call.llm_seconds += perf_counter() - started
    if isinstance(answer, dict):
        # some providers' answers name no model; the request's prices them
        reader.read_usage(answer if "model" in answer else {**answer, "model": model}, call)
    call.finish()
    return answer


def _attempt(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    call = _call.get()
    if call is None:
        return wrapped(*args, **kwargs)
    LEDGER.refuse_if_stopped(call)  # after a 429 storm, not even the judge's own retry
    response = wrapped(*args, **kwargs)
    status = getattr(response, "status_code", None)
    if type(status) is int and (status >= 400 or _in_streak(call)):
        body = response.content if status in REFUSAL_STATUSES else None
        LEDGER.attempted(call, attempt_of(status, response.headers, body))
    return response


def _in_streak(call: Call) -> bool:
    return any(account.consecutive_rate_limited for account in call.accounts)
