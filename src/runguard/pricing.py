"""Prices per token, from the ``genai-prices`` catalogue, resolved once per model.

A raw ``genai_prices.calc_price`` costs about 150 µs, far too much for every
call. RunGuard asks it once per (provider, model) for the model's price
sheet and keeps the per-token rates as floats, so pricing a call is a dict
lookup and four multiplications. Tiered prices (a higher rate for every
token once the input passes a threshold, as genai-prices models them) are
kept as a short list of thresholds.

Users override or add prices with :class:`Price`, per RunGuard:
``RunGuard(prices={"my-finetune": Price(input=3, output=12)})``, or alias a
name to a known model: ``prices={"my-azure-deployment": "gpt-4o"}``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_PER_MTOK = 1e-6


@dataclass(frozen=True, slots=True)
class Price:
    """A model's price in USD per million tokens.

    ``cache_read`` and ``cache_write`` default to the input price (an upper
    bound: no provider charges more for a cache hit than for fresh input).
    """

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_read", "cache_write"):
            value = getattr(self, name)
            if value is None and name.startswith("cache"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Price.{name} must be a number (USD per million tokens)")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Price.{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per token for each input bucket and for output, at one tier."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    #: (threshold, rates): once input tokens exceed the threshold, every
    #: token of the call is priced at those rates. Sorted, highest last.
    tiers: tuple[tuple[int, Rates], ...] = ()

    def cost(
        self, input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
    ) -> float:
        rates = self
        for threshold, tier in self.tiers:
            if input_tokens > threshold:
                rates = tier
        fresh = input_tokens - cache_read - cache_write
        if fresh < 0:
            fresh = 0
        return (
            fresh * rates.input
            + cache_read * rates.cache_read
            + cache_write * rates.cache_write
            + output_tokens * rates.output
        )

    @classmethod
    def from_price(cls, price: Price) -> Rates:
        cache_read = price.input if price.cache_read is None else price.cache_read
        cache_write = price.input if price.cache_write is None else price.cache_write
        return cls(
            price.input * _PER_MTOK,
            price.output * _PER_MTOK,
            cache_read * _PER_MTOK,
            cache_write * _PER_MTOK,
        )


PriceOverrides = Mapping[str, "Price | str"]

_catalogue: dict[tuple[str, str], Rates | None] = {}
_catalogue_lock = threading.Lock()


def catalogue_rates(provider: str, model: str) -> Rates | None:
    """Rates for ``model`` from genai-prices, or None when it has no price."""
    key = (provider, model)
    try:
        return _catalogue[key]
    except KeyError:
        pass
    # Resolving imports genai-prices (~250 ms the first time); the lock keeps
    # concurrent first calls from doing it twice, and it is never taken again.
    with _catalogue_lock:
        if key not in _catalogue:
            _catalogue[key] = _resolve(provider, model)
    return _catalogue[key]


def _resolve(provider: str, model: str) -> Rates | None:
    try:
        from genai_prices import Usage, calc_price

        sheet = calc_price(Usage(input_tokens=1, output_tokens=1), model, provider_id=provider)
    except Exception:  # LookupError for unknown models; anything else is no price either
        return None
    return _rates_from_sheet(sheet.model_price)


def _rates_from_sheet(sheet: Any) -> Rates:
    def field(name: str, fallback: Any) -> Any:
        value = getattr(sheet, name, None)
        return fallback if value is None else value

    raw_input = field("input_mtok", 0)
    raw = {
        "input": raw_input,
        "output": field("output_mtok", 0),
        "cache_read": field("cache_read_mtok", raw_input),
        "cache_write": field("cache_write_mtok", raw_input),
    }
    thresholds = sorted(
        {tier.start for value in raw.values() if hasattr(value, "tiers") for tier in value.tiers}
    )

    def at(threshold: int | None) -> Rates:
        values: dict[str, float] = {}
        for name, value in raw.items():
            if hasattr(value, "tiers"):
                chosen = value.base
                for tier in value.tiers:
                    if threshold is not None and threshold >= tier.start:
                        chosen = tier.price
                value = chosen
            values[name] = float(value) * _PER_MTOK
        return Rates(values["input"], values["output"], values["cache_read"], values["cache_write"])

    base = at(None)
    if not thresholds:
        return base
    return Rates(
        base.input,
        base.output,
        base.cache_read,
        base.cache_write,
        tiers=tuple((start, at(start)) for start in thresholds),
    )


def normalize_prices(prices: Any) -> dict[str, Rates | str]:
    """Validate ``RunGuard(prices=...)``; aliases stay names, prices become rates."""
    if prices is None:
        return {}
    if not isinstance(prices, Mapping):
        raise TypeError("prices must be a mapping of model name to runguard.Price or a model name")
    result: dict[str, Rates | str] = {}
    for model, price in prices.items():
        if not isinstance(model, str) or not model:
            raise TypeError(f"prices keys must be model names (non-empty str), got {model!r}")
        if isinstance(price, str):
            if not price:
                raise ValueError(f"prices[{model!r}]: an alias must name a model, got ''")
            result[model] = price
        elif isinstance(price, Price):
            result[model] = Rates.from_price(price)
        elif isinstance(price, Mapping):
            try:
                result[model] = Rates.from_price(Price(**price))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prices[{model!r}]: {exc}") from None
        else:
            raise TypeError(
                f"prices[{model!r}] must be a runguard.Price, a mapping of its fields, "
                f"or the name of a known model; got {type(price).__name__}"
            )
    return result


def rates_for(
    provider: str, model: str, overrides: tuple[Mapping[str, Rates | str], ...] = ()
) -> Rates | None:
    """Rates for ``model``: the innermost override that names it, else the catalogue.

    An alias (a model name as the value) is followed, through the overrides
    again and then the catalogue; a cycle of aliases has no price.
    """
    if not overrides:
        cached = _catalogue.get((provider, model))
        return cached if cached is not None else catalogue_rates(provider, model)
    seen: set[str] = set()
    while True:
        for table in overrides:
            found = table.get(model)
            if found is not None:
                break
        else:
            return catalogue_rates(provider, model)
        if isinstance(found, Rates):
            return found
        seen.add(model)
        if found in seen:
            return None
        model = found


def dollars(value: float) -> str:
    """``value`` in a refusal's words: to the millionth of a dollar, at least to the cent.

    Four decimals made a refusal under a small limit read "would bring cost to $0.0010,
    over the limit of $0.0010".
    """
    text = f"{value:,.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"
