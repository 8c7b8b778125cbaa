"""Input-token estimates: the heuristic against real o200k counts, the exact tiktoken
path built offline from bpe-openai's shipped encoding file, and never the network."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.registry
from hypothesis import given, settings
from hypothesis import strategies as st

from runguard import RunGuard, tokens
from runguard.testing import FakeProvider, Reply
from runguard.tokens import (
    IMAGE_TOKENS,
    count_content,
    count_messages,
    counter_for,
    heuristic_tokens,
    is_exact,
)

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_KEY = hashlib.sha1(O200K_URL.encode()).hexdigest()

SAMPLES = {
    "english": (
        "The quick brown fox jumps over the lazy dog. In 2023, researchers at several "
        "universities published findings suggesting that large language models can be "
        "steered with surprisingly small amounts of feedback, although the effect varies "
        "widely between tasks and evaluation settings. Nobody expected the results to "
        "hold up under replication, yet most of them did."
    ),
    "code": '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


class Cache:
    def __init__(self, size=128):
        self._data = {}
        self.size = size

    def get(self, key, default=None):
        return self._data.get(key, default)
''',
    "json": (
        '{"id": "user_12345", "name": "Alice Example", "email": "alice@example.com", '
        '"roles": ["admin", "editor"], "settings": {"theme": "dark", "notifications": true, '
        '"timezone": "Europe/Berlin"}, "scores": [98.5, 87.25, 73, 100], '
        '"created_at": "2024-05-17T09:32:11Z", "tags": null}'
    ),
    "japanese": (
        "東京都は日本の首都であり、世界でも有数の大都市です。人口は約千四百万人で、政治、経済、"
        "文化の中心地として機能しています。今日はとても良い天気ですね。公園に散歩に行きませんか。"
        "お弁当を持って行きましょう。機械学習モデルの推論コストを管理するために、呼び出し回数と"
        "トークン数に上限を設けることが重要です。"
    ),
    "russian": (
        "Агент отправляет модели запрос, получает ответ и решает, что делать дальше. "
        "Если инструмент каждый раз возвращает ошибку, цикл может продолжаться часами, "
        "а счёт за вызовы растёт незаметно. Поэтому ограничение числа вызовов и токенов "
        "нужно проверять до отправки запроса, а не после."
    ),
    "emoji": (
        "Shipped it 🎉🎉 thanks team 🙌 — tests green ✅, deploy done 🚀, coffee ☕️ next. "
        "Review later 👀? Sure 👍🏽 see you tomorrow 😀 bye 👋 "
    )
    * 2,
}

CHAT = [
    {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
    {"role": "user", "name": "alice", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": 'Now list three JSON keys: {"a": 1, "b": [2, 3]}'},
]


def cookbook_count(messages: list[dict[str, str]], encoding) -> int:
    """OpenAI cookbook: num_tokens_from_messages, for gpt-4o-era models."""
    tokens_per_message, tokens_per_name = 3, 1
    total = 0
    for message in messages:
        total += tokens_per_message
        for key, value in message.items():
            total += len(encoding.encode(value))
            if key == "name":
                total += tokens_per_name
    return total + 3


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def o200k_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """o200k_base.tiktoken from bpe-openai, under tiktoken's cache name."""
    spec = importlib.util.find_spec("bpe_openai")  # located, not imported
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    source = package / "data" / "o200k_base.tiktoken.gz"
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    target = cache / O200K_KEY
    target.write_bytes(gzip.decompress(source.read_bytes()))
    return target


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every attempt to resolve or connect, refused and recorded."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture
def fresh_counters(monkeypatch: pytest.MonkeyPatch, network_attempts) -> list[tuple]:
    """No cached counters, no tiktoken environment, no network."""
    monkeypatch.setattr(tokens, "_openai_counters", {})
    monkeypatch.setattr(tokens, "_encodings", {})
    for name in ("RUNGUARD_TIKTOKEN", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    return network_attempts


@pytest.fixture
def exact(fresh_counters, monkeypatch: pytest.MonkeyPatch, o200k_file: Path):
    """tiktoken's cache holds o200k_base; returns the reference encoding."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(o200k_file.parent))
    encoding = tiktoken.get_encoding("o200k_base")
    assert fresh_counters == []
    return encoding


@pytest.fixture
def cold_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget encodings tiktoken already loaded, so it would have to read (or fetch) again."""
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


# -- the heuristic ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_heuristic_is_within_25_percent_of_o200k(kind: str, exact) -> None:
    text = SAMPLES[kind]
    real = len(exact.encode_ordinary(text))
    estimate = heuristic_tokens(text)
    assert real > 40  # a sample big enough to mean something
    assert abs(estimate - real) <= 0.25 * real, (kind, estimate, real)


def test_heuristic_edge_cases() -> None:
    assert heuristic_tokens("") == 0
    assert heuristic_tokens("a") == 1
    assert heuristic_tokens(" ") >= 1
    long = SAMPLES["english"] * 20
    assert heuristic_tokens(long) == pytest.approx(20 * heuristic_tokens(SAMPLES["english"]), 0.05)


# -- the exact path --------------------------------------------------------------------------


def test_with_the_encoding_cached_openai_counts_are_exact(exact, fresh_counters) -> None:
    assert is_exact("openai", "gpt-4o")
    assert is_exact("openai", "gpt-4o-mini")
    assert not is_exact("anthropic", "claude-haiku-4-5")
    count = counter_for("openai", "gpt-4o")
    for text in SAMPLES.values():
        assert count(text) == len(exact.encode_ordinary(text))
    assert fresh_counters == []


def test_counters_are_cached_per_model(exact) -> None:
    first = counter_for("openai", "gpt-4o")
    assert counter_for("openai", "gpt-4o") is first
    assert tokens._openai_counters["gpt-4o"] is first


def test_a_model_of_another_encoding_falls_back_without_download(exact, fresh_counters) -> None:
    # gpt-4 uses cl100k_base, which is not in the cache: heuristic, no fetch
    assert not is_exact("openai", "gpt-4")
    assert fresh_counters == []


def test_count_messages_matches_the_cookbook(exact) -> None:
    count = counter_for("openai", "gpt-4o")
    assert count_messages(CHAT, count) == cookbook_count(CHAT, exact)
    for n in range(len(CHAT) + 1):
        assert count_messages(CHAT[:n], count) == cookbook_count(CHAT[:n], exact)


def test_a_chat_call_reserves_the_cookbook_count(exact, fresh_counters) -> None:
    seen = []

    class Spy:
        name = "spy"
        needs_price = False

        def admit(self, request, account):
            seen.append(request)

        def settled(self, request, result, account):
            return None

    fake = FakeProvider(default=Reply(input_tokens=77, output_tokens=3))
    client = fake.openai(max_retries=0)
    with RunGuard(guards=[Spy()]):
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=32)
    assert fake.wire_count == 1
    assert fake.requests[0].body["messages"] == CHAT
    assert [r.input_tokens for r in seen] == [cookbook_count(CHAT, exact)]
    assert fresh_counters == []


# -- falling back, offline -------------------------------------------------------------------


def test_runguard_tiktoken_0_forces_the_heuristic(
    exact, fresh_counters, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNGUARD_TIKTOKEN", "0")
    assert not is_exact("openai", "gpt-4o")
    count = counter_for("openai", "gpt-4o")
    for text in SAMPLES.values():
        assert count(text) == heuristic_tokens(text)
    assert count_messages(CHAT, count) == 3 + sum(
        3 + sum(heuristic_tokens(v) for v in m.values()) + ("name" in m) for m in CHAT
    )
    assert fresh_counters == []


def test_without_a_cache_file_the_heuristic_is_used_offline(
    fresh_counters, cold_tiktoken, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert not is_exact("openai", "gpt-4o")
    assert counter_for("openai", "gpt-4o")(SAMPLES["english"]) == heuristic_tokens(
        SAMPLES["english"]
    )
    assert fresh_counters == []
    assert list(tmp_path.iterdir()) == []


def test_without_a_cache_file_a_guarded_call_never_fetches(
    fresh_counters, cold_tiktoken, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    fake = FakeProvider()
    client = fake.openai(max_retries=0)
    with RunGuard(max_calls=2) as guard:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=8)
    assert fake.wire_count == 1 == guard.usage.calls
    assert fresh_counters == []


def test_a_corrupt_cache_file_falls_back_without_fetching(
    fresh_counters, cold_tiktoken, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    corrupt = tmp_path / O200K_KEY
    corrupt.write_bytes(b"not an encoding file\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert not is_exact("openai", "gpt-4o")
    assert fresh_counters == [], "tiktoken was allowed to re-download a corrupt cache file"
    assert corrupt.read_bytes() == b"not an encoding file\n"


def test_tiktoken_cache_disabled_means_no_exact_counts_and_no_fetch(
    fresh_counters, cold_tiktoken, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, o200k_file
) -> None:
    # tiktoken reads TIKTOKEN_CACHE_DIR="" as "no cache: always download";
    # the file in DATA_GYM_CACHE_DIR is then never read by tiktoken.
    shutil.copy(o200k_file, tmp_path / O200K_KEY)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    counter_for("openai", "gpt-4o")("hello")
    assert fresh_counters == [], "tiktoken was allowed to download the encoding"


def test_data_gym_cache_dir_is_honoured(
    fresh_counters, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, o200k_file
) -> None:
    shutil.copy(o200k_file, tmp_path / O200K_KEY)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    assert is_exact("openai", "gpt-4o")
    assert fresh_counters == []


# -- images and other binary parts -------------------------------------------------------------

B64 = base64.b64encode(os.urandom(60_000)).decode()  # 80,000 characters of base64


def _without(parts: list[dict], kind: str) -> list[dict]:
    return [p for p in parts if p.get("type") != kind]


IMAGE_PARTS = [
    ("image_url", {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}}),
    (
        "image",
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
    ),
    ("input_image", {"type": "input_image", "image_url": f"data:image/png;base64,{B64}"}),
    ("input_audio", {"type": "input_audio", "input_audio": {"data": B64, "format": "wav"}}),
    ("input_file", {"type": "input_file", "filename": "a.pdf", "file_data": B64}),
    (
        "document",
        {"type": "document", "source": {"type": "base64", "media_type": "pdf", "data": B64}},
    ),
]


@pytest.mark.parametrize("counting", ["heuristic", "exact"])
@pytest.mark.parametrize(("kind", "part"), IMAGE_PARTS, ids=[k for k, _ in IMAGE_PARTS])
def test_binary_parts_count_image_tokens_not_their_base64(
    kind: str, part: dict, counting: str, request: pytest.FixtureRequest, monkeypatch
) -> None:
    if counting == "exact":
        request.getfixturevalue("exact")
    else:
        request.getfixturevalue("fresh_counters")
        monkeypatch.setenv("RUNGUARD_TIKTOKEN", "0")
    count = counter_for("openai", "gpt-4o")
    parts = [{"type": "text", "text": "What is in this picture?"}, part]
    with_part = count_messages([{"role": "user", "content": parts}], count)
    without = count_messages([{"role": "user", "content": _without(parts, kind)}], count)
    assert with_part - without == IMAGE_TOKENS
    assert count_content(part, count) == IMAGE_TOKENS
    two = count_content([part, part], count)
    assert two == 2 * IMAGE_TOKENS
    assert with_part < len(B64) / 20


@pytest.mark.parametrize(
    "source",
    [
        {"type": "text", "media_type": "text/plain", "data": "TEXT"},
        {"type": "content", "content": [{"type": "text", "text": "TEXT"}]},
    ],
    ids=["text", "content"],
)
def test_a_document_given_as_text_counts_its_text_not_a_files_figure(
    fresh_counters, source: dict
) -> None:
    count = counter_for("anthropic", "claude-haiku-4-5")
    text = "The quarterly report. " * 3000  # far more than IMAGE_TOKENS

    def document(text: str) -> dict:
        given = {k: (text if v == "TEXT" else v) for k, v in source.items()}
        if "content" in given:
            given["content"] = [{"type": "text", "text": text}]
        return {"type": "document", "source": given}

    # its text, plus the few tokens of a content block's "type": "text"
    assert count(text) <= count_content(document(text), count) <= count(text) + 3
    assert count_content(document("short"), count) <= count("short") + 3 < IMAGE_TOKENS
    assert count(text) > IMAGE_TOKENS


def test_an_image_call_is_admitted_under_a_token_ceiling(fresh_counters) -> None:
    fake = FakeProvider(default=Reply(input_tokens=IMAGE_TOKENS, output_tokens=5))
    client = fake.openai(max_retries=0)
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe it."}, image]}]
    with RunGuard(max_input_tokens=IMAGE_TOKENS + 100, max_calls=1) as guard:
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=10)
    assert fake.wire_count == 1
    assert guard.usage.input_tokens == IMAGE_TOKENS


# -- fingerprinting walk -------------------------------------------------------------

_texts = st.sampled_from(["", "x", "find x", "user", "assistant", "ann", "call_1", "{}"])
_leaves = st.one_of(_texts, st.none(), st.integers(-2, 2), st.booleans())
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6,
)
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": _texts}, optional={"content": _values, "name": _texts, "type": _texts}
    ).flatmap(lambda m: st.dictionaries(_texts, _values, max_size=2).map(lambda x: {**x, **m})),
    max_size=4,
)
# the common case: messages of plain texts, which a fingerprinting walk takes whole
_flat_messages = st.lists(
    st.dictionaries(_texts, _texts, max_size=3).map(lambda m: {**m, "content": m.get("", "x")}),
    max_size=3,
)


def _noted(messages: Any) -> tuple[int, tuple[Any, ...]]:
    trace: list[Any] = []
    total = count_messages(messages, counter_for("openai", "gpt-4o"), trace.append)
    return total, tuple(trace)


@settings(max_examples=300, deadline=None)
@given(_messages | _flat_messages)
def test_a_fingerprinting_walk_counts_what_a_plain_one_counts(messages: Any) -> None:
    # messages of plain values are counted whole from a memo when noted; the rest are walked
    count = counter_for("openai", "gpt-4o")
    assert _noted(messages)[0] == count_messages(messages, count)
    assert _noted(messages) == _noted(messages)  # memo hits note what misses noted


def _ordered(value: Any) -> Any:
    """``value`` compared as a fingerprint compares it: key order counts."""
    if isinstance(value, dict):
        return ("dict", tuple((key, _ordered(item)) for key, item in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_ordered(item) for item in value))
    return value


@settings(max_examples=300, deadline=None)
@given(_messages | _flat_messages, _messages | _flat_messages)
def test_different_histories_are_noted_differently(first: Any, second: Any) -> None:
    # what is noted is hashed into the loop guards' fingerprint
    if _ordered(first) != _ordered(second):
        assert _noted(first)[1] != _noted(second)[1]
    else:
        assert _noted(first)[1] == _noted(copy.deepcopy(second))[1]


def test_a_tool_call_turn_with_text_is_walked_without_raising_inside() -> None:
    # Models often say something before a tool call, and some integrations send "" as the
    # text. Taken as a plain message, such a turn's key does not hash; raising and catching
    # that on every fingerprinted call cost more than walking it.
    turn = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    messages = [{"role": "user", "content": "find x"}, turn]
    raised: list[type[BaseException]] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "exception":
            raised.append(arg[0])
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        total, notes = _noted(messages)
    finally:
        sys.settrace(previous)
    assert raised == []
    assert total == count_messages(messages, counter_for("openai", "gpt-4o"))
    changed = copy.deepcopy(messages)
    changed[1]["tool_calls"][0]["function"]["arguments"] = '{"q": 1}'
    assert _noted(changed)[1] != notes
