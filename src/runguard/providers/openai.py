"""The ``openai`` SDK: which requests are LLM calls, and where their usage is."""

from __future__ import annotations

import copy
from typing import Any

from .._call import Call
from .._records import ToolCall
from ..tokens import Note, count_content, count_fields, count_messages, counter_for
from ._body import billable, body_of, fingerprint, int_field, str_field
from ._stainless import Plan, make_plan

name = "openai"
attempt_method = "_send_request"

_ENDPOINTS = {
    "/chat/completions": "chat.completions",
    "/responses": "responses",
    "/responses/compact": "responses.compact",
    "/completions": "completions",
    "/embeddings": "embeddings",
}
#: the legacy completions API's own default for ``max_tokens``
_LEGACY_DEFAULT_MAX_TOKENS = 16
_TERMINAL_RESPONSE_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


def describe(options: Any, want_fingerprint: bool = False) -> Plan | None:
    found = billable(options, _ENDPOINTS)
    if found is None:
        return None
    endpoint, body = found
    model = str_field(body, "model")
    count = counter_for(name, model)
    # the token count's walk notes what a fingerprint hashes
    trace: list[Any] | None = [] if want_fingerprint else None
    note = None if trace is None else trace.append
    if endpoint == "chat.completions":
        tokens = count_messages(body.get("messages"), count, note)
        tokens += count_fields(body, ("tools", "functions", "response_format"), count, note)
        cap = int_field(body, "max_completion_tokens", "max_tokens")
    elif endpoint.startswith("responses"):
        tokens = count_messages(body.get("input"), count, note)
        # a stored prompt's variables are text the model reads; its id is noted only
        tokens += count_fields(body, ("instructions", "tools", "text", "prompt"), count, note)
        cap = int_field(body, "max_output_tokens")
    elif endpoint == "completions":
        tokens = _count_inputs(body.get("prompt"), count, note)
        cap = int_field(body, "max_tokens") or _LEGACY_DEFAULT_MAX_TOKENS
    else:  # embeddings produce no output tokens
        tokens = _count_inputs(body.get("input"), count, note)
        cap = 0
    if cap is not None and ("n" in body or "best_of" in body):
        cap *= max(int_field(body, "n") or 1, int_field(body, "best_of") or 1)
    digest = None
    if trace is not None:
        extra = body.get("tool_choice")
        if endpoint.startswith("responses"):
            # the same input continues a different conversation: not the same request
            extra = (extra, body.get("previous_response_id"), body.get("conversation"))
        digest = fingerprint(trace, endpoint, model, extra)
    return make_plan((endpoint, model, tokens, cap, body.get("stream") is True, digest))


def _count_inputs(value: Any, count: Any, note: Note | None) -> int:
    """Prompts and embedding inputs: text, lists of text, or lists of token ids."""
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        if note is not None:
            note(tuple(value))
        return len(value)
    if isinstance(value, list):
        if note is not None:
            note(len(value))
        return sum(_count_inputs(v, count, note) for v in value)
    return count_content(value, count, note)


def prepare(options: Any, call: Call) -> Any:
    """Ask a chat-completion stream for its usage, and hide that extra chunk from the caller.

    Without ``stream_options.include_usage`` the provider reports no usage on
    a stream. Raw streaming responses are left alone: their caller reads the
    bytes, so an extra chunk would show.
    """
    if call.request.endpoint != "chat.completions":
        return options
    headers = getattr(options, "headers", None)
    if isinstance(headers, dict) and headers.get("X-Stainless-Raw-Response"):
        return options
    body = body_of(options)
    if body is None:
        return options
    stream_options = body.get("stream_options")
    if isinstance(stream_options, dict) and stream_options.get("include_usage") is True:
        return options
    merged = dict(stream_options) if isinstance(stream_options, dict) else {}
    merged["include_usage"] = True
    prepared = copy.copy(options)
    # extra_body is merged over the body when the request is built, so the
    # option goes where the caller's own stream_options would otherwise win.
    extra = getattr(options, "extra_json", None)
    if isinstance(extra, dict) and "stream_options" in extra:
        prepared.extra_json = {**extra, "stream_options": merged}
    else:
        prepared.json_data = {**options.json_data, "stream_options": merged}
    call.hide_usage_chunk = True
    return prepared


def read_usage(data: Any, call: Call) -> None:
    if not isinstance(data, dict):
        return
    if "event" in data and isinstance(data.get("data"), dict):
        data = data["data"]  # the SDK's synthesized {"event", "data"} envelope
    if call.tool_calls is not None:
        _read_tool_calls(data, call)
    usage = data.get("usage")
    model = data.get("model")
    if usage is None and data.get("type") in _TERMINAL_RESPONSE_EVENTS:
        response = data.get("response")
        if isinstance(response, dict):
            usage = response.get("usage")
            model = response.get("model")
    if not isinstance(usage, dict):
        return
    # chat completions, legacy completions and embeddings name them prompt/completion;
    # the Responses API, input/output
    if "prompt_tokens" in usage:
        fed, made, details = (
            usage["prompt_tokens"],
            usage.get("completion_tokens"),
            usage.get("prompt_tokens_details"),
        )
    else:
        fed, made, details = (
            usage.get("input_tokens"),
            usage.get("output_tokens"),
            usage.get("input_tokens_details"),
        )
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    # counts that are not ints (absent, null) are 0; checked inline, as this runs per event
    call.observe(
        model,
        fed if type(fed) is int else 0,
        made if type(made) is int else 0,
        cached if type(cached) is int else 0,
    )


def _read_tool_calls(data: dict[str, Any], call: Call) -> None:
    """Collect the tool calls of a body (replacing, so a body read twice counts once)."""
    found = call.tool_calls
    assert found is not None
    choices = data.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            if isinstance(message, dict):  # a whole chat completion
                found[:] = _chat_tool_calls(choices)
                return
            delta = choice.get("delta")
            if isinstance(delta, dict):  # a stream chunk: tool calls arrive in pieces
                _collect_pieces(delta, choice.get("index", 0), call)
        return
    response = data.get("response") if data.get("type") in _TERMINAL_RESPONSE_EVENTS else data
    if isinstance(response, dict) and isinstance(response.get("output"), list):
        found[:] = [
            ToolCall.of(item.get("name"), item.get("arguments", item.get("input")))
            for item in response["output"]
            if isinstance(item, dict) and item.get("type") in ("function_call", "custom_tool_call")
        ]


def _chat_tool_calls(choices: list[Any]) -> list[ToolCall]:
    calls = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        for item in message.get("tool_calls") or ():
            function = item.get("function") if isinstance(item, dict) else None
            if isinstance(function, dict):
                calls.append(ToolCall.of(function.get("name"), function.get("arguments")))
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            calls.append(ToolCall.of(legacy.get("name"), legacy.get("arguments")))
    return calls


def _collect_pieces(delta: dict[str, Any], choice: object, call: Call) -> None:
    pieces = [
        ((choice, item.get("index", 0)), item.get("function"))
        for item in delta.get("tool_calls") or ()
        if isinstance(item, dict)
    ]
    if isinstance(delta.get("function_call"), dict):
        pieces.append(((choice, "function_call"), delta["function_call"]))
    for key, function in pieces:
        if not isinstance(function, dict):
            continue
        if call.pending_tools is None:
            call.pending_tools = {}
        entry = call.pending_tools.setdefault(key, ["", ""])
        if isinstance(function.get("name"), str):
            entry[0] += function["name"]
        if isinstance(function.get("arguments"), str):
            entry[1] += function["arguments"]
