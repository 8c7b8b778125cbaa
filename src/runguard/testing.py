"""Real SDK clients over an in-memory provider, for RunGuard's tests and yours.

:class:`FakeProvider` answers the OpenAI and Anthropic HTTP APIs (chat
completions, Responses, legacy completions, embeddings, Messages, token
counting, model lists) from a script of :class:`Reply` objects, with JSON
bodies or server-sent-event streams, any status code and optional delays. It
records every HTTP request that reaches it, so a test can assert on what
actually left the SDK, retries included::

    from runguard.testing import FakeProvider, Reply

    fake = FakeProvider(default=Reply(input_tokens=50, output_tokens=10))
    client = fake.openai()             # a real openai.OpenAI
    with RunGuard(max_calls=3):
        ...
    assert fake.wire_count == 3

Token counts in a :class:`Reply` use RunGuard's convention: ``input_tokens``
is every input token, cache reads and writes included. The fake translates
them into each provider's own fields (Anthropic reports fresh input apart
from cache reads and writes).

:class:`FakeJudge` is a judge LLM for MLflow's evaluations: MLflow's judges
post with ``requests`` rather than an SDK, so it is a real HTTP server on
127.0.0.1, speaking the OpenAI chat-completions API.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FakeJudge", "FakeProvider", "Reply", "WireRequest"]

_BASE_URL = "http://runguard.fake"


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``status`` other than 2xx sends the provider's error body (``error``
    sets its message), or ``body`` if given (any JSON value, to play a
    gateway's own error format). ``usage=False`` leaves usage out of the answer.
    ``tool_calls`` is a list of ``(tool name, arguments dict)``. ``chunks``
    splits the text into that many stream events. ``delay`` (seconds) is
    slept before answering (``asyncio.sleep`` for async clients).
    """

    text: str = "ok"
    input_tokens: int = 10
    output_tokens: int = 5
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    usage: bool = True
    model: str | None = None
    status: int = 200
    error: str | None = None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    tool_calls: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    chunks: int = 3
    delay: float = 0.0


@dataclass(frozen=True)
class WireRequest:
    """An HTTP request that reached the fake provider."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None


Responder = Callable[[WireRequest], Reply]


class FakeProvider:
    """An in-memory OpenAI- and Anthropic-compatible endpoint that counts what reaches it.

    Replies come from :meth:`script` (first in, first out), then from
    ``responder`` (a function of the request) if given, then ``default``.
    Thread- and task-safe.
    """

    def __init__(self, default: Reply | None = None, responder: Responder | None = None) -> None:
        self.default = default or Reply()
        self.responder = responder
        self.requests: list[WireRequest] = []
        self._script: deque[Reply] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- scripting and inspection ------------------------------------------------

    def script(self, *replies: Reply) -> FakeProvider:
        """Queue replies to send, in order, before falling back to the default."""
        with self._lock:
            self._script.extend(replies)
        return self

    @property
    def wire_count(self) -> int:
        """How many HTTP requests reached the provider (SDK retries included)."""
        return len(self.requests)

    def count(self, path_suffix: str = "") -> int:
        """Requests whose path ends with ``path_suffix``."""
        return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._script.clear()

    # -- clients -----------------------------------------------------------------

    def openai(self, **kwargs: Any) -> Any:
        """A real ``openai.OpenAI`` client whose HTTP goes to this fake."""
        import openai

        return openai.OpenAI(**self._client_kwargs(openai, False, "/v1", kwargs))

    def async_openai(self, **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(**self._client_kwargs(openai, True, "/v1", kwargs))

    def azure_openai(self, **kwargs: Any) -> Any:
        """A real ``openai.AzureOpenAI`` client (deployment ``"my-deployment"`` by default)."""
        import openai

        kwargs.setdefault("azure_endpoint", _BASE_URL)
        kwargs.setdefault("api_version", "2024-10-21")
        kwargs.setdefault("azure_deployment", "my-deployment")
        options = self._client_kwargs(openai, False, None, kwargs)
        return openai.AzureOpenAI(**options)

    def anthropic(self, **kwargs: Any) -> Any:
        """A real ``anthropic.Anthropic`` client whose HTTP goes to this fake."""
        import anthropic

        return anthropic.Anthropic(**self._client_kwargs(anthropic, False, "", kwargs))

    def async_anthropic(self, **kwargs: Any) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(**self._client_kwargs(anthropic, True, "", kwargs))

    def _client_kwargs(
        self, sdk: Any, is_async: bool, base_path: str | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        http = _http_module(sdk)
        if is_async:
            transport = http.MockTransport(self._handle_async)
            client = http.AsyncClient(transport=transport)
        else:
            client = http.Client(transport=http.MockTransport(self._handle))
        options: dict[str, Any] = {"api_key": "test-key", "http_client": client}
        if base_path is not None:
            options["base_url"] = _BASE_URL + base_path
        options.update(kwargs)
        return options

    # -- the wire ----------------------------------------------------------------

    def _record(self, request: Any) -> tuple[WireRequest, Reply]:
        raw = request.content
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        wire = WireRequest(
            method=request.method,
            path=request.url.path,
            headers=dict(request.headers),
            body=body,
        )
        with self._lock:
            self.requests.append(wire)
            reply = self._script.popleft() if self._script else None
        if reply is None:
            reply = self.responder(wire) if self.responder is not None else self.default
        return wire, reply

    def _handle(self, request: Any) -> Any:
        wire, reply = self._record(request)
        if reply.delay:
            time.sleep(reply.delay)
        return _unread(request, self._respond(request, wire, reply), iter)

    async def _handle_async(self, request: Any) -> Any:
        wire, reply = self._record(request)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return _unread(request, self._respond(request, wire, reply), _arrive)

    def _respond(self, request: Any, wire: WireRequest, reply: Reply) -> Any:
        http = _module_of(request)
        headers = {"x-request-id": f"req_{next(self._ids)}", **reply.headers}
        if reply.status >= 400:
            if reply.status == 429:
                headers.setdefault("retry-after-ms", "1")
            body = reply.body if reply.body is not None else _error_body(wire.path, reply)
            return http.Response(reply.status, json=body, headers=headers)
        answer = _answer(wire, reply, next(self._ids))
        if isinstance(answer, list):
            payload = "".join(answer).encode()
            headers["content-type"] = "text/event-stream"
            return http.Response(reply.status, content=payload, headers=headers)
        return http.Response(reply.status, json=answer, headers=headers)


def _unread(request: Any, response: Any, chunks: Callable[[list[bytes]], Any]) -> Any:
    """``response`` with its body arriving as over a network: unread until the client reads it.

    A response built from bytes holds its body from the start; an SDK that
    asks for a stream (even one answered with an error) would then find it
    read. A response that already streams its body is left as it is.
    """
    http = _module_of(request)
    if not isinstance(response.stream, http.ByteStream):
        return response
    body = chunks([response.content])
    return http.Response(response.status_code, headers=response.headers, content=body)


async def _arrive(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def _http_module(sdk: Any) -> Any:
    base = sdk._base_client
    return getattr(base, "httpx2", None) or base.httpx


def _module_of(request: Any) -> Any:
    import importlib

    return importlib.import_module(type(request).__module__.split(".")[0])


def _error_body(path: str, reply: Reply) -> dict[str, Any]:
    message = reply.error or f"scripted error {reply.status}"
    if path.startswith("/v1/messages") or path.startswith("/v1/complete"):
        kinds = {429: "rate_limit_error", 529: "overloaded_error", 400: "invalid_request_error"}
        kind = kinds.get(reply.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    code = "rate_limit_exceeded" if reply.status == 429 else None
    return {"error": {"message": message, "type": "error", "param": None, "code": code}}


def _pieces(text: str, n: int) -> list[str]:
    n = max(1, min(n, len(text) or 1))
    size = -(-len(text) // n) if text else 0
    return [text[i * size : (i + 1) * size] for i in range(n)] if text else [""]


def _sse(data: Any, event: str | None = None) -> str:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n"


def _answer(wire: WireRequest, reply: Reply, n: int) -> Any:
    body = wire.body if isinstance(wire.body, dict) else {}
    model = reply.model or body.get("model") or "unknown-model"
    stream = body.get("stream") is True
    path = wire.path
    if path.endswith("/messages/count_tokens"):
        return {"input_tokens": reply.input_tokens}
    if path.endswith("/v1/messages"):
        return _anthropic_message(reply, model, n, stream)
    if path.endswith("/chat/completions"):
        return _chat(reply, model, n, stream, _wants_usage(body))
    if path.endswith("/responses") or path.endswith("/responses/compact"):
        return _responses(reply, model, n, stream)
    if path.endswith("/completions"):
        return _legacy_completion(reply, model, n, stream, _wants_usage(body))
    if path.endswith("/embeddings"):
        return _embeddings(reply, model, body)
    if wire.method == "GET":
        return {"object": "list", "data": [], "has_more": False}
    return {}


def _wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _openai_usage(reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.input_tokens,
        "completion_tokens": reply.output_tokens,
        "total_tokens": reply.input_tokens + reply.output_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _chat_tool_calls(reply: Reply, n: int) -> list[dict[str, Any]]:
    # ids unique per answer, as the APIs' are: agents remember the calls they answered
    return [
        {
            "id": f"call_{n}_{i}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(dict(args))},
        }
        for i, (name, args) in enumerate(reply.tool_calls)
    ]


def _chat(reply: Reply, model: str, n: int, stream: bool, include_usage: bool) -> Any:
    created = int(time.time())
    ident = f"chatcmpl-{n}"
    finish = "tool_calls" if reply.tool_calls else "stop"
    if not stream:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
        if reply.tool_calls:
            message["content"] = None
            message["tool_calls"] = _chat_tool_calls(reply, n)
        answer: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
        }
        if reply.usage:
            answer["usage"] = _openai_usage(reply)
        return answer

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if include_usage:
            data["usage"] = None
        return data

    events = [_sse(chunk({"role": "assistant", "content": ""}, None))]
    if reply.tool_calls:
        # as the API does: the name first, then the arguments in pieces
        for i, call in enumerate(_chat_tool_calls(reply, n)):
            head = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
            events.append(_sse(chunk({"tool_calls": [{"index": i, **head}]}, None)))
            for piece in _pieces(call["function"]["arguments"], reply.chunks):
                delta = {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}
                events.append(_sse(chunk(delta, None)))
    else:
        pieces = _pieces(reply.text, reply.chunks)
        events += [_sse(chunk({"content": piece}, None)) for piece in pieces]
    events.append(_sse(chunk({}, finish)))
    if include_usage and reply.usage:
        events.append(
            _sse(
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": _openai_usage(reply),
                }
            )
        )
    events.append("data: [DONE]\n\n")
    return events


def _legacy_completion(reply: Reply, model: str, n: int, stream: bool, include_usage: bool) -> Any:
    base = {"id": f"cmpl-{n}", "object": "text_completion", "created": 0, "model": model}
    if not stream:
        answer = {
            **base,
            "choices": [
                {"text": reply.text, "index": 0, "logprobs": None, "finish_reason": "stop"}
            ],
        }
        if reply.usage:
            answer["usage"] = _openai_usage(reply)
        return answer
    events = [
        _sse(
            {**base, "choices": [{"text": p, "index": 0, "logprobs": None, "finish_reason": None}]}
        )
        for p in _pieces(reply.text, reply.chunks)
    ]
    if include_usage and reply.usage:
        events.append(_sse({**base, "choices": [], "usage": _openai_usage(reply)}))
    events.append("data: [DONE]\n\n")
    return events


def _embeddings(reply: Reply, model: str, body: Mapping[str, Any]) -> Any:
    inputs = body.get("input")
    count = (
        len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
    )
    answer: dict[str, Any] = {
        "object": "list",
        "model": model,
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.0, 0.1, 0.2]} for i in range(count)
        ],
    }
    if reply.usage:
        answer["usage"] = {"prompt_tokens": reply.input_tokens, "total_tokens": reply.input_tokens}
    return answer


def _responses_body(reply: Reply, model: str, n: int, status: str, final: bool) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if final:
        output = [
            {
                "type": "function_call",
                "id": f"fc_{n}_{i}",
                "call_id": f"call_{n}_{i}",
                "name": name,
                "arguments": json.dumps(dict(args)),
                "status": "completed",
            }
            for i, (name, args) in enumerate(reply.tool_calls)
        ] or [_responses_message(reply.text)]
    usage = None
    if final and reply.usage:
        usage = {
            "input_tokens": reply.input_tokens,
            "input_tokens_details": {"cached_tokens": reply.cache_read_tokens},
            "output_tokens": reply.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": reply.input_tokens + reply.output_tokens,
        }
    return {
        "id": f"resp_{n}",
        "object": "response",
        "created_at": 0,
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def _responses_message(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _responses(reply: Reply, model: str, n: int, stream: bool) -> Any:
    if not stream:
        return _responses_body(reply, model, n, "completed", final=True)
    seq = itertools.count()
    events = [
        _sse(
            {
                "type": "response.created",
                "sequence_number": next(seq),
                "response": _responses_body(reply, model, n, "in_progress", final=False),
            },
            "response.created",
        )
    ]
    item = {**_responses_message(""), "status": "in_progress", "content": []}
    events.append(
        _sse(
            {
                "type": "response.output_item.added",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": item,
            },
            "response.output_item.added",
        )
    )
    events.append(
        _sse(
            {
                "type": "response.content_part.added",
                "sequence_number": next(seq),
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
            "response.content_part.added",
        )
    )
    for piece in _pieces(reply.text, reply.chunks):
        events.append(
            _sse(
                {
                    "type": "response.output_text.delta",
                    "sequence_number": next(seq),
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                },
                "response.output_text.delta",
            )
        )
    events.append(
        _sse(
            {
                "type": "response.output_text.done",
                "sequence_number": next(seq),
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "text": reply.text,
                "logprobs": [],
            },
            "response.output_text.done",
        )
    )
    events.append(
        _sse(
            {
                "type": "response.output_item.done",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": _responses_message(reply.text),
            },
            "response.output_item.done",
        )
    )
    events.append(
        _sse(
            {
                "type": "response.completed",
                "sequence_number": next(seq),
                "response": _responses_body(reply, model, n, "completed", final=True),
            },
            "response.completed",
        )
    )
    return events


def _anthropic_usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
    fresh = reply.input_tokens - reply.cache_read_tokens - reply.cache_write_tokens
    return {
        "input_tokens": max(0, fresh),
        "output_tokens": output_tokens,
        "cache_read_input_tokens": reply.cache_read_tokens,
        "cache_creation_input_tokens": reply.cache_write_tokens,
    }


def _anthropic_message(reply: Reply, model: str, n: int, stream: bool) -> Any:
    content: list[dict[str, Any]] = [
        {"type": "tool_use", "id": f"toolu_{n}_{i}", "name": name, "input": dict(args)}
        for i, (name, args) in enumerate(reply.tool_calls)
    ] or [{"type": "text", "text": reply.text}]
    stop = "tool_use" if reply.tool_calls else "end_turn"
    message: dict[str, Any] = {
        "id": f"msg_{n}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
    }
    if reply.usage:
        message["usage"] = _anthropic_usage(reply, reply.output_tokens)
    if not stream:
        return message
    start = {**message, "content": [], "stop_reason": None}
    if reply.usage:
        start["usage"] = _anthropic_usage(reply, 1)
    events = [_sse({"type": "message_start", "message": start}, "message_start")]
    for index, block in enumerate(content):
        if block["type"] == "tool_use":
            opened = {**block, "input": {}}
            kind, pieces = "input_json_delta", _pieces(json.dumps(block["input"]), reply.chunks)
        else:
            opened = {"type": "text", "text": ""}
            kind, pieces = "text_delta", _pieces(reply.text, reply.chunks)
        events.append(
            _sse(
                {"type": "content_block_start", "index": index, "content_block": opened},
                "content_block_start",
            )
        )
        field_name = "partial_json" if kind == "input_json_delta" else "text"
        for piece in pieces:
            events.append(
                _sse(
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": kind, field_name: piece},
                    },
                    "content_block_delta",
                )
            )
        events.append(_sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if reply.usage:
        delta["usage"] = {"output_tokens": reply.output_tokens}
    events.append(_sse(delta, "message_delta"))
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return events


class FakeJudge:
    """An OpenAI-compatible judge LLM on 127.0.0.1 for MLflow's judges; counts what reaches it.

    Use it as a context manager, and point MLflow's judges at :attr:`url`
    (``OPENAI_BASE_URL=judge.url`` for the built-in scorers and legacy
    metrics, or ``make_judge(..., base_url=judge.url + "/chat/completions")``)::

        with FakeJudge() as judge:
            os.environ["OPENAI_BASE_URL"] = judge.url
            mlflow.genai.evaluate(...)
        print(judge.count)

    Every answer is ``verdict`` as JSON (by default one that both the
    ``mlflow.genai`` judges and the legacy ``mlflow.metrics.genai`` metrics
    read as a pass), with the usage given. The first ``fail_first``
    requests are answered ``fail_status`` instead (429 by default).
    """

    DEFAULT_VERDICT: Mapping[str, Any] = {
        "result": "yes",
        "rationale": "The answer is supported.",
        "score": 5,
        "justification": "The answer is supported.",
    }

    def __init__(
        self,
        verdict: Mapping[str, Any] | None = None,
        input_tokens: int = 120,
        output_tokens: int = 15,
        fail_first: int = 0,
        fail_status: int = 429,
    ) -> None:
        self.verdict = dict(verdict if verdict is not None else self.DEFAULT_VERDICT)
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.fail_first = fail_first
        self.fail_status = fail_status
        #: the JSON body of every request that reached the judge, in arrival order
        self.requests: list[Any] = []
        self.url = ""
        self._lock = threading.Lock()
        self._server: Any = None

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> FakeJudge:
        from http.server import ThreadingHTTPServer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _judge_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, body: Any) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            number = len(self.requests)
        if number <= self.fail_first:
            message = "judge unavailable" if self.fail_status != 429 else "slow down"
            return self.fail_status, {"error": {"message": message, "type": "server_error"}}
        model = body.get("model", "gpt-4.1-mini") if isinstance(body, dict) else "gpt-4.1-mini"
        return 200, {
            "id": f"judge-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": json.dumps(self.verdict)},
                }
            ],
            "usage": {
                "prompt_tokens": self.input_tokens,
                "completion_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens,
            },
        }


def _judge_handler(judge: FakeJudge) -> Any:
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(size) or b"null")
            except ValueError:
                body = None
            status, answer = judge._answer(body)
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a test's output stays clean

    return Handler
