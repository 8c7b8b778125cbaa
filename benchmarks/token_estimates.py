"""How far RunGuard's heuristic token estimate is from o200k, by kind of text.

Run ``python benchmarks/token_estimates.py`` (seconds; needs the dev extras for
``tiktoken`` and ``bpe-openai``, which ships the o200k encoding file, so
nothing is downloaded).

The text comes from this machine: English documentation and package
copyright files under ``/usr/share/doc``, Python source from the standard
library, JSON built from those words, and prose in other languages from the
translated manual pages (``/usr/share/man/<lang>``) and message catalogues
(``/usr/share/locale``) that Debian installs. Each kind is cut into samples of
1,200 characters; the table prints the mean, smallest and largest relative
error of ``runguard.tokens.heuristic_tokens`` against o200k. Kinds with no
text on the machine are skipped.
"""

from __future__ import annotations

import gettext
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import statistics
import sysconfig
import tempfile
from pathlib import Path

import tiktoken

from runguard.tokens import heuristic_tokens

SAMPLE = 1200
PER_KIND = 30
LANGUAGES = ("ar", "cs", "de", "el", "es", "fr", "he", "hi", "it", "ja", "ko")
LANGUAGES += ("nl", "pl", "pt_BR", "ru", "sv", "th", "tr", "uk", "vi", "zh_CN")


def o200k() -> tiktoken.Encoding:
    """o200k_base from the file bpe-openai ships, placed where tiktoken's cache looks."""
    spec = importlib.util.find_spec("bpe_openai")  # located, not imported
    assert spec is not None and spec.submodule_search_locations, "install the dev extras"
    packed = Path(next(iter(spec.submodule_search_locations))) / "data" / "o200k_base.tiktoken.gz"
    cache = Path(tempfile.mkdtemp(prefix="runguard-tiktoken-"))
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(
        gzip.decompress(packed.read_bytes())
    )
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return tiktoken.get_encoding("o200k_base")


def samples(text: str, rng: random.Random) -> list[str]:
    if len(text) < SAMPLE * 2:
        return []
    starts = [rng.randrange(len(text) - SAMPLE) for _ in range(PER_KIND)]
    return [text[start : start + SAMPLE] for start in starts]


def printable(text: str) -> bool:
    return all(c.isprintable() or c in "\n\t\r" for c in text)


def manual_text(lang: str) -> str:
    parts = []
    for path in glob.glob(f"/usr/share/man/{lang}/man*/*.gz"):
        try:
            troff = gzip.decompress(Path(path).read_bytes()).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = [line for line in troff.splitlines() if not line.startswith((".", "'"))]
        parts.append(re.sub(r"\\f[BIRP]|\\\(..|\\[&e]", "", "\n".join(lines)).replace("\\-", "-"))
    return "\n".join(parts)


def catalogue_text(lang: str) -> str:
    parts = []
    for path in glob.glob(f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo"):
        try:
            with open(path, "rb") as file:
                catalog = gettext.GNUTranslations(file)._catalog  # type: ignore[attr-defined]
        except (OSError, ValueError):  # unreadable or not UTF-8
            continue
        parts += [v for k, v in catalog.items() if k and isinstance(v, str)]
    return "\n".join(parts)


def corpus(rng: random.Random) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    docs = []
    for path in glob.glob("/usr/share/doc/*/README*") + glob.glob("/usr/share/doc/*/copyright"):
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if printable(text):
            docs.append(text)
    english = "\n".join(docs)
    kinds["english"] = samples(english, rng)
    stdlib = Path(sysconfig.get_path("stdlib"))
    code = "\n".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:80])
    kinds["python"] = samples(code, rng)
    words = english.split() or ["word"]

    def record() -> dict[str, object]:
        return {
            rng.choice(words)[:12]: rng.choice(
                [rng.randint(0, 10**6), rng.random(), " ".join(rng.sample(words, 5)), None]
            )
            for _ in range(10)
        }

    kinds["json"] = [json.dumps([record() for _ in range(3)])[:SAMPLE] for _ in range(PER_KIND)]
    for lang in LANGUAGES:
        kinds[f"{lang} (manuals)"] = samples(manual_text(lang), rng)
        kinds[f"{lang} (messages)"] = samples(catalogue_text(lang), rng)
    return {kind: texts for kind, texts in kinds.items() if texts}


def main() -> None:
    encoding = o200k()
    rng = random.Random(7)
    print(f"{'text':22} {'samples':>7} {'mean':>7} {'min':>7} {'max':>7}")
    for kind, texts in corpus(rng).items():
        errors = []
        for text in texts:
            real = len(encoding.encode_ordinary(text))
            errors.append((heuristic_tokens(text) - real) / real * 100)
        print(
            f"{kind:22} {len(errors):7} {statistics.fmean(errors):+6.1f}% "
            f"{min(errors):+6.1f}% {max(errors):+6.1f}%"
        )


if __name__ == "__main__":
    main()
