"""The ``anthropic`` SDK (also Bedrock, Vertex and beta clients): LLM calls and their usage."""

from __future__ import annotations

import json
from typing import Any

from .._call import Call
from .._records import ToolCall
from ..tokens import count_content, count_fields, count_messages, counter_for
from ._body import billable, fingerprint, int_field, str_field
from ._stainless import Plan, make_plan

name = "anthropic"
attempt_method = "_attempt_request"

_ENDPOINTS = {"/v1/messages": "messages", "/v1/complete": "complete"}


def describe(options: Any, want_fingerprint: bool = False) -> Plan | None:
    # Bedrock and Vertex rewrite the URL and move the model later, inside the
    # retry loop; at request() the logical path and the model are still here.
    found = billable(options, _ENDPOINTS)
    if found is None:
        return None
    endpoint, body = found
    model = str_field(body, "model")
    count = counter_for(name, model)
    # the token count's walk notes what a fingerprint hashes
    trace: list[Any] | None = [] if want_fingerprint else None
    note = None if trace is None else trace.append
    if endpoint == "messages":
        tokens = count_messages(body.get("messages"), count, note)
        tokens += count_fields(body, ("system", "tools"), count, note)
        cap = int_field(body, "max_tokens")
    else:
        tokens = count_content(body.get("prompt"), count, note)
        cap = int_field(body, "max_tokens_to_sample")
    digest = None
    if trace is not None:
        digest = fingerprint(trace, endpoint, model, body.get("tool_choice"))
    return make_plan((endpoint, model, tokens, cap, body.get("stream") is True, digest))


def prepare(options: Any, call: Call) -> Any:
    return options  # Anthropic streams always carry their usage


def read_usage(data: Any, call: Call) -> None:
    if not isinstance(data, dict):
        return
    kind = data.get("type")
    if call.tool_calls is not None:
        _read_tool_calls(kind, data, call)
    if kind == "message":
        usage, model, final = data.get("usage"), data.get("model"), True
    elif kind == "message_start":
        message = data.get("message")
        if not isinstance(message, dict):
            return
        usage, model, final = message.get("usage"), message.get("model"), False
    elif kind == "message_delta":
        # cumulative counts for the whole message so far; the last one is final
        usage, model, final = data.get("usage"), None, True
    else:
        return
    if not isinstance(usage, dict):
        return
    # A count that is not an int (absent, null) keeps the value an earlier event of the
    # message gave, as the SDK's own accumulation does (0 before any); checked inline, as
    # this runs per event.
    before_read, before_write = call.cache_read_tokens, call.cache_write_tokens
    cache_read = usage.get("cache_read_input_tokens")
    cache_read = cache_read if type(cache_read) is int else before_read
    cache_write = usage.get("cache_creation_input_tokens")
    cache_write = cache_write if type(cache_write) is int else before_write
    fresh = usage.get("input_tokens")
    if type(fresh) is not int:
        fresh = call.input_tokens - before_read - before_write
    output = usage.get("output_tokens")
    call.observe(
        model,
        fresh + cache_read + cache_write,
        output if type(output) is int else 0,
        cache_read,
        cache_write,
        final=final,
    )


def _read_tool_calls(kind: object, data: dict[str, Any], call: Call) -> None:
    found = call.tool_calls
    assert found is not None
    if kind == "message":  # a whole message: replace, so a body read twice counts once
        found[:] = [
            ToolCall.of(block.get("name"), block.get("input"))
            for block in data.get("content") or ()
            if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use")
        ]
    elif kind == "content_block_start":
        block = data.get("content_block")
        if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use"):
            if call.pending_tools is None:
                call.pending_tools = {}
            # The API opens the block with an empty input and streams it in pieces; an
            # input given whole at the start (as some proxies do) is taken as it is.
            given = block.get("input")
            start = json.dumps(given) if isinstance(given, dict) and given else ""
            call.pending_tools[data.get("index")] = [str(block.get("name")), start]
    elif kind == "content_block_delta" and call.pending_tools:
        delta = data.get("delta")
        entry = call.pending_tools.get(data.get("index"))
        if entry is not None and isinstance(delta, dict):
            partial = delta.get("partial_json")
            if isinstance(partial, str):
                entry[1] += partial
