"""Input-token estimates made before a call is sent.

Two counters, chosen once per process:

* **Exact (OpenAI models)**: when ``tiktoken`` is installed *and* its
  encoding file is already on disk (tiktoken's own cache, see
  ``TIKTOKEN_CACHE_DIR``), text is counted with the model's encoding. RunGuard
  never lets tiktoken download anything: a missing file means the heuristic.
  Set ``RUNGUARD_TIKTOKEN=0`` to always use the heuristic.
* **Heuristic (everything else)**: a linear model over character classes
  (ASCII words and letters, digit runs and digits, punctuation, newlines;
  words and letters of other alphabets; ideographs; emoji), fitted to o200k
  counts. ``benchmarks/token_estimates.py`` measures it against o200k: on
  average within ±10 % for English, code, JSON, CJK, Cyrillic, Arabic,
  Hindi and Romance languages, while German, Dutch, Italian, Swedish and
  Polish come out 9-21 % low (their words split into more tokens than
  English ones); single samples of 1,200 characters stray further. Claude's
  tokenizer is not public; for Anthropic models the heuristic is scaled up
  by :data:`ANTHROPIC_FACTOR` so that reservations err on the high side.
  An estimate only decides admission: what is charged is what the provider
  reports.

Chat messages add the per-message overhead of OpenAI's published counting
rule (3 tokens a message, 1 for a ``name``, 3 to prime the reply). Images
and other binary parts count :data:`IMAGE_TOKENS` each instead of their
base64 text. Counts of strings are cached (bounded), because an agent loop
resends the same history on every call; so are counts of whole messages of
plain text, which a walk that fingerprints the request takes in one piece.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

#: Tokens charged for one image, audio or file part of a request (an upper
#: bound of what OpenAI and Anthropic charge for a high-detail image).
IMAGE_TOKENS = 1600
#: Claude counts more tokens than o200k for the same text.
ANTHROPIC_FACTOR = 1.2
#: Per-message overhead of the chat format, and the reply primer.
MESSAGE_TOKENS = 3
REPLY_TOKENS = 3

_CACHE_LIMIT = 16_384
_WORDS = re.compile(r"[A-Za-z]+")
_DIGIT_RUNS = re.compile(r"[0-9]+")
_IDEOGRAPHIC = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_IDEOGRAPHS = re.compile(f"[{_IDEOGRAPHIC}]")
_UNICODE_WORDS = re.compile(f"[^\\W\\d_{_IDEOGRAPHIC}]+")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_CYRILLIC = re.compile("[\u0400-\u04ff]")
_LATIN_EXTENDED = re.compile("[\u00c0-\u024f]")
_VIETNAMESE = re.compile("[\u1e00-\u1eff]")
_BINARY_TYPES = frozenset(
    {"image", "image_url", "input_image", "input_audio", "audio", "file", "input_file", "document"}
)
# Keys whose values are identifiers or binary payloads, not text the model reads.
_SKIP_KEYS = frozenset({"id", "tool_call_id", "call_id", "cache_control", "image_url", "data"})
# Keys whose values are the caller's own JSON (a tool call's input, a tool's schema):
# every text in them counts, whatever its key, since those keys are the caller's.
_DATA_KEYS = frozenset({"input", "input_schema", "parameters", "schema", "arguments"})

Counter = Callable[[str], int]
#: what receives the notes of a walk that also fingerprints (see count_content)
Note = Callable[[Any], None]


def heuristic_tokens(text: str) -> int:
    """Estimate o200k tokens of ``text`` from its character classes."""
    n = len(text)
    if n == 0:
        return 0
    ascii_text = text if text.isascii() else text.encode("ascii", "ignore").decode("ascii")
    words = _WORDS.findall(ascii_text)
    letters = sum(map(len, words))
    digit_runs = _DIGIT_RUNS.findall(ascii_text)
    digits = sum(map(len, digit_runs))
    newlines = ascii_text.count("\n")
    spaces = ascii_text.count(" ") + ascii_text.count("\t") + newlines + ascii_text.count("\r")
    punct = len(ascii_text) - letters - digits - spaces
    estimate = (
        0.704 * len(words)
        + 0.066 * letters
        + 0.993 * len(digit_runs)
        + 0.415 * digits
        + 0.579 * punct
        + 0.987 * newlines
    )
    if n != len(ascii_text):
        estimate += _non_ascii_tokens(text)
    return max(1, round(estimate))


def _non_ascii_tokens(text: str) -> float:
    # o200k spends about a third of a token per Cyrillic letter; accented
    # Latin words split into more pieces than their ASCII letters suggest;
    # other alphabets (Greek, Arabic, Hebrew, Devanagari, Thai…) cost per word
    # and letter; ideographs (Han, kana, Hangul) nearly one each; emoji and
    # other astral characters two or three. Vietnamese syllables are priced
    # well by their ASCII letters alone, and combining marks and most
    # symbols merge into their neighbours.
    total = 0.775 * len(_IDEOGRAPHS.findall(text)) + 2.378 * len(_ASTRAL.findall(text))
    for word in _UNICODE_WORDS.findall(text):
        if word.isascii() or _VIETNAMESE.search(word):
            continue
        extra = len(word) - len(word.encode("ascii", "ignore"))
        if _CYRILLIC.search(word):
            total += 0.322 * extra
        elif _LATIN_EXTENDED.search(word):
            total += 2.14 + 0.267 * extra
        else:
            total += 0.428 + 0.386 * extra
    return total


def _anthropic_tokens(text: str) -> int:
    return round(heuristic_tokens(text) * ANTHROPIC_FACTOR)


class _Memo(dict[Any, int]):
    """Counts already made, by what was counted: agent loops resend the same history.

    A hit is a plain dict lookup, with no Python frame in between: the walk
    below looks up every string of the history on every call. Bounded: full,
    it starts over.
    """

    __slots__ = ("count",)

    def __init__(self, count: Callable[[Any], int]) -> None:
        super().__init__()
        self.count = count

    def __missing__(self, key: Any) -> int:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        tokens = self[key] = self.count(key)
        return tokens


class _Texts(_Memo):
    """Counts of strings, and of whole chat messages of plain values.

    ``messages`` is keyed by ``tuple(message.items())``. When a request is
    fingerprinted, that key is noted in one piece, which saves walking the
    message to note its fields one by one. (Without a fingerprint, building
    the key costs as much as the walk it saves.)
    """

    __slots__ = ("messages",)

    def __init__(self, count: Counter) -> None:
        super().__init__(count)
        self.messages = _Memo(functools.partial(_message_tokens, self.__getitem__))


def _message_tokens(count: Counter, items: tuple[tuple[Any, Any], ...]) -> int:
    message = dict(items)
    tokens = MESSAGE_TOKENS + _count_mapping(message, count, None)
    return tokens + 1 if "name" in message else tokens


def _cached(count: Counter) -> Counter:
    return _Texts(count).__getitem__


# The encoding files tiktoken downloads, and their published SHA-256: a cached
# file is used only if it is intact, since tiktoken would re-fetch any other.
_TIKTOKEN_FILES = {
    name: (f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken", digest)
    for name, digest in (
        ("o200k_base", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
        ("cl100k_base", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
        ("p50k_base", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"),
        ("r50k_base", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    )
}
_heuristic = _cached(heuristic_tokens)
_anthropic = _cached(_anthropic_tokens)
_openai_counters: dict[str, Counter] = {}
_encodings: dict[str, Counter | None] = {}


def _tiktoken_counter(model: str) -> Counter | None:
    """A tiktoken counter for ``model`` if one can be had without the network."""
    if os.environ.get("RUNGUARD_TIKTOKEN", "1") == "0":
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        name = "o200k_base"
    if name not in _encodings:
        _encodings[name] = _load_encoding(tiktoken, name)
    return _encodings[name]


def _load_encoding(tiktoken: Any, name: str) -> Counter | None:
    known = _TIKTOKEN_FILES.get(name)
    path = _tiktoken_cache_path(known[0]) if known else None
    if known is None or path is None:
        return None
    try:
        with open(path, "rb") as file:
            intact = hashlib.sha256(file.read()).hexdigest() == known[1]
    except OSError:
        return None
    if not intact:
        return None
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception:  # an unreadable encoding must not break the agent
        return None
    encode = encoding.encode_ordinary
    return _cached(lambda text: len(encode(text)))


def _tiktoken_cache_path(url: str) -> str | None:
    """Where tiktoken caches ``url``, by tiktoken's own rules; None when it caches nothing."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def counter_for(provider: str, model: str) -> Counter:
    """The text counter used for ``model``: exact where possible, else heuristic."""
    if provider != "openai":
        return _anthropic
    counter = _openai_counters.get(model)
    if counter is None:
        counter = _openai_counters[model] = _tiktoken_counter(model) or _heuristic
    return counter


def is_exact(provider: str, model: str) -> bool:
    """Whether estimates for ``model`` come from its real tokenizer."""
    counter = counter_for(provider, model)
    return counter is not _heuristic and counter is not _anthropic


def count_content(value: Any, count: Counter, note: Note | None = None) -> int:
    """Tokens of the text inside a JSON-like request value.

    Walks strings, lists and dicts; images, audio and files count
    :data:`IMAGE_TOKENS`; identifiers and cache markers count nothing.

    With ``note`` (a list's ``append``, say), the walk also passes it what it
    visits (texts, keys, identifiers, where each container starts and ends),
    so that a hash of what was noted identifies the request's content without
    walking it a second time (the loop guards' fingerprints).
    """
    # Exact type checks first: request bodies are plain dicts, lists and
    # strings, and this walk runs over the whole history on every call.
    kind = type(value)
    if kind is str:
        if note is not None:
            note(value)
        return count(value)
    if kind is dict:
        return _count_mapping(value, count, note)
    if kind is list or kind is tuple:
        return _count_sequence(value, count, note)
    if value is None or kind is int or kind is float or kind is bool:
        if note is not None:
            note(value)
        return 0
    if isinstance(value, str):
        if note is not None:
            note(value)
        return count(value)
    if isinstance(value, Mapping):
        return _count_mapping(value, count, note)
    if isinstance(value, (list, tuple)):
        return _count_sequence(value, count, note)
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return count_content(dump(), count, note)
    if note is not None:
        note(repr(value))
    return 0


#: where a container starts and ends, in the notes
_MAPPING = object()
_SEQUENCE = object()
_END = object()


def _count_sequence(value: Any, count: Counter, note: Note | None) -> int:
    if note is not None:
        note(_SEQUENCE)
    total = 0
    for item in value:
        kind = type(item)
        if kind is str:
            if note is not None:
                note(item)
            total += count(item)
        elif kind is dict:
            total += _count_mapping(item, count, note)
        else:
            total += count_content(item, count, note)
    if note is not None:
        note(_END)
    return total


def _count_mapping(value: Mapping[Any, Any], count: Counter, note: Note | None) -> int:
    if value.get("type") in _BINARY_TYPES:
        source = value.get("source")
        if type(source) is dict and source.get("type") in ("text", "content"):
            # an Anthropic document given as text, not as a file: its text counts
            text = source.get("data") if source["type"] == "text" else source.get("content")
            return count_content(text, count, note)
        if note is not None:
            note(repr(value))  # the content itself: two images must not look alike
        return IMAGE_TOKENS
    total = 0
    # Nested dicts (a tool call's function) come here directly, without
    # count_content's dispatch: one Python call less per level, on every call.
    if note is None:
        for key, item in value.items():
            if key in _SKIP_KEYS:
                continue
            kind = type(item)
            if kind is str:
                total += count(item)
            elif key in _DATA_KEYS:
                total += _count_data(item, count, None)
            elif kind is dict:
                total += _count_mapping(item, count, None)
            else:
                total += count_content(item, count)
        return total
    note(_MAPPING)
    for key, item in value.items():
        kind = type(item)
        if kind is str:
            note((key, item))
            if key not in _SKIP_KEYS:
                total += count(item)
        elif key in _SKIP_KEYS:
            note((key, repr(item)))
        elif key in _DATA_KEYS:
            note(key)
            total += _count_data(item, count, note)
        else:
            note(key)
            if kind is dict:
                total += _count_mapping(item, count, note)
            else:
                total += count_content(item, count, note)
    note(_END)
    return total


def _count_data(value: Any, count: Counter, note: Note | None) -> int:
    """Tokens of the caller's own JSON: every text in it, none skipped as an identifier."""
    kind = type(value)
    if kind is str:
        if note is not None:
            note(value)
        return count(value)
    if kind is dict or isinstance(value, Mapping):
        if note is not None:
            note(_MAPPING)
        total = 0
        for key, item in value.items():
            if note is not None:
                note(key)
            total += _count_data(item, count, note)
        if note is not None:
            note(_END)
        return total
    if kind is list or kind is tuple:
        if note is not None:
            note(_SEQUENCE)
        total = sum(_count_data(item, count, note) for item in value)
        if note is not None:
            note(_END)
        return total
    return count_content(value, count, note)  # numbers and None count nothing


def count_messages(messages: Any, count: Counter, note: Note | None = None) -> int:
    """Tokens of a chat history, with the chat format's per-message overhead.

    ``note`` as for :func:`count_content`.
    """
    if not isinstance(messages, (list, tuple)):
        return count_content(messages, count, note)
    known = None
    if note is not None:
        note(_SEQUENCE)
        memo = getattr(count, "__self__", None)
        known = memo.messages if type(memo) is _Texts else None
    total = REPLY_TOKENS
    for message in messages:
        if type(message) is dict:
            if note is None and "type" not in message:
                # _count_mapping inlined for the common case: a chat message
                total += MESSAGE_TOKENS
                for key, item in message.items():
                    if key not in _SKIP_KEYS:
                        total += count(item) if type(item) is str else count_content(item, count)
            else:
                if (
                    known is not None
                    and note is not None
                    and type(message.get("content")) is str
                    and "tool_calls" not in message
                ):
                    # Fingerprinting, a message of plain values (its content text) is
                    # counted whole from the memo and noted as its key: no walk. A
                    # tool-call turn with text is not plain: its key would not hash,
                    # and raising that costs more than the walk.
                    items = tuple(message.items())
                    try:
                        total += known[items]
                    except TypeError:  # a value that is not hashable: walked below
                        pass
                    else:
                        note(items)
                        continue
                total += MESSAGE_TOKENS + _count_mapping(message, count, note)
            if "name" in message:
                total += 1
        else:
            total += MESSAGE_TOKENS + count_content(message, count, note)
            if isinstance(message, Mapping) and "name" in message:
                total += 1
    if note is not None:
        note(_END)
    return total


def count_fields(
    body: Mapping[str, Any], keys: tuple[str, ...], count: Counter, note: Note | None
) -> int:
    """Tokens of those of ``keys`` that ``body`` has; ``note`` as for :func:`count_content`."""
    total = 0
    for key in keys:
        if key in body:
            if note is not None:
                note(key)
            total += count_content(body[key], count, note)
    return total
