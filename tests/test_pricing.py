"""Per-token rates resolved from genai-prices agree with genai-prices itself.

``genai_prices.calc_price`` is the reference: RunGuard resolves a model's
price sheet once and prices calls with plain float arithmetic, which must
land on the same dollars (cache reads, cache writes and tiers included).
"""

from __future__ import annotations

import threading
import time
import warnings

import genai_prices
import pytest
from genai_prices import data_snapshot, types

from runguard import BudgetExceeded, Price, RunGuard, UnknownModelPrice, pricing
from runguard.pricing import Rates, catalogue_rates, rates_for
from runguard.testing import FakeProvider, Reply


def reference(provider: str, model: str, inp: int, out: int, read: int = 0, write: int = 0):
    usage = genai_prices.Usage(
        input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write
    )
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


USAGES = [
    (1, 1, 0, 0),
    (1_000, 500, 0, 0),
    (1_000, 500, 300, 0),
    (1_000, 500, 300, 100),
    (12_345, 0, 0, 12_345),
    (50_000, 4_096, 40_000, 5_000),
    (0, 1_000, 0, 0),
]
MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-haiku-4-5"),
    ("anthropic", "claude-sonnet-4-5"),
]


@pytest.mark.parametrize(("provider", "model"), MODELS)
@pytest.mark.parametrize("usage", USAGES, ids=lambda u: "-".join(map(str, u)))
def test_cost_matches_genai_prices(provider: str, model: str, usage) -> None:
    rates = catalogue_rates(provider, model)
    assert isinstance(rates, Rates)
    expected = reference(provider, model, *usage)
    assert rates.cost(*usage) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_cache_reads_are_cheaper_than_fresh_input() -> None:
    # guards against a cost formula that ignores the cache buckets
    for provider, model in MODELS:
        rates = catalogue_rates(provider, model)
        assert rates is not None
        assert rates.cost(1_000, 0, cache_read=1_000) < rates.cost(1_000, 0)


def _tiered_models() -> list[tuple[str, str, int]]:
    """(provider, model, threshold) for catalogue models whose input price is tiered."""
    found = []
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id not in ("openai", "anthropic"):
            continue
        for model in provider.models:
            price = model.prices
            if not isinstance(price, types.ModelPrice):
                continue  # conditional prices: not a single sheet
            tiers = getattr(price, "input_mtok", None)
            if isinstance(tiers, types.TieredPrices) and tiers.tiers:
                found.append((provider.id, model.id, tiers.tiers[0].start))
    return found


TIERED = _tiered_models()


def test_the_catalogue_has_tiered_models() -> None:
    assert TIERED, "no openai/anthropic model with TieredPrices in the installed genai-prices"


@pytest.mark.parametrize(("provider", "model", "threshold"), TIERED or [("x", "x", 0)])
def test_tiered_prices_on_both_sides_of_the_threshold(provider, model, threshold) -> None:
    if provider == "x":
        pytest.skip("no tiered model installed")
    rates = catalogue_rates(provider, model)
    assert rates is not None and rates.tiers, f"{model} lost its tiers"
    below = (threshold, 2_000, threshold // 4, threshold // 10)
    above = (threshold + 1, 2_000, threshold // 4, threshold // 10)
    far_above = (threshold * 2, 10, 0, 0)
    for usage in (below, above, far_above, (threshold, 1, 0, 0), (threshold + 1, 1, 0, 0)):
        expected = reference(provider, model, *usage)
        assert rates.cost(*usage) == pytest.approx(expected, rel=1e-9), usage
    # one more input token crosses the tier: the whole call gets dearer per token
    assert rates.cost(threshold + 1, 1) / (threshold + 1) > rates.cost(threshold, 1) / threshold


@pytest.mark.parametrize(
    ("provider", "dated", "base"),
    [
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ],
)
def test_dated_ids_resolve(provider: str, dated: str, base: str) -> None:
    rates = catalogue_rates(provider, dated)
    assert rates is not None
    assert rates == catalogue_rates(provider, base)
    assert rates.cost(1_000, 200, 100) == pytest.approx(
        reference(provider, dated, 1_000, 200, 100), rel=1e-9
    )


@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("openai", "no-such-model-xyz"),
        ("anthropic", "claude-imaginary-99"),
        ("openai", ""),
        ("no-such-provider", "gpt-4o"),
    ],
)
def test_unknown_model_has_no_rates(provider: str, model: str) -> None:
    assert catalogue_rates(provider, model) is None
    assert rates_for(provider, model) is None


def test_resolved_rates_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    first = catalogue_rates("openai", "gpt-4o")
    assert first is not None
    assert catalogue_rates("openai", "cached-miss-model") is None
    consulted = []

    def no_more_lookups(*args, **kwargs):
        consulted.append(args)
        raise LookupError("genai-prices consulted again")

    monkeypatch.setattr(genai_prices, "calc_price", no_more_lookups)
    assert catalogue_rates("openai", "gpt-4o") is first
    assert rates_for("openai", "gpt-4o") is first
    assert catalogue_rates("openai", "cached-miss-model") is None  # a miss is cached as well
    assert consulted == []


def test_concurrent_first_lookups_resolve_once(monkeypatch: pytest.MonkeyPatch) -> None:
    key = ("openai", "gpt-4o-mini-2024-07-18")
    monkeypatch.delitem(pricing._catalogue, key, raising=False)
    real = genai_prices.calc_price
    calls = []

    def slow(*args, **kwargs):
        calls.append(args[1])
        time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(genai_prices, "calc_price", slow)
    barrier = threading.Barrier(8)
    results = []

    def work() -> None:
        barrier.wait()
        results.append(catalogue_rates(*key))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [key[1]]
    assert len(results) == 8
    assert results[0] is not None
    assert all(r is results[0] for r in results)


# -- overrides and aliases ----------------------------------------------------------------


def test_price_override_is_usd_per_million_tokens() -> None:
    rates = Rates.from_price(Price(input=3, output=12))
    table = {"my-finetune": rates}
    found = rates_for("openai", "my-finetune", (table,))
    assert found is rates
    assert found.cost(1_000_000, 1_000_000) == pytest.approx(15.0)
    # cache buckets default to the input price
    assert found.cost(1_000, 0, cache_read=400, cache_write=100) == pytest.approx(1_000 * 3e-6)
    explicit = Rates.from_price(Price(input=3, output=12, cache_read=0.3, cache_write=3.75))
    assert explicit.cost(1_000, 10, 400, 100) == pytest.approx(
        (500 * 3 + 400 * 0.3 + 100 * 3.75 + 10 * 12) * 1e-6
    )


def test_an_override_shadows_the_catalogue() -> None:
    cheap = Rates.from_price(Price(input=0.01, output=0.02))
    assert rates_for("openai", "gpt-4o", ({"gpt-4o": cheap},)) is cheap
    assert rates_for("openai", "gpt-4o") is catalogue_rates("openai", "gpt-4o")


def test_the_innermost_override_wins() -> None:
    inner = Rates.from_price(Price(input=1, output=1))
    outer = Rates.from_price(Price(input=2, output=2))
    assert rates_for("openai", "m", ({"m": inner}, {"m": outer})) is inner
    assert rates_for("openai", "m", ({}, {"m": outer})) is outer


def test_an_alias_prices_as_the_named_model() -> None:
    gpt4o = catalogue_rates("openai", "gpt-4o")
    assert gpt4o is not None
    assert rates_for("openai", "my-azure-deployment", ({"my-azure-deployment": "gpt-4o"},)) is gpt4o
    # chains are followed through every table, inner to outer
    mine = Rates.from_price(Price(input=5, output=6))
    chain = ({"a": "b"}, {"b": "c", "c": mine})
    assert rates_for("openai", "a", chain) is mine
    assert rates_for("openai", "a", ({"a": "b"}, {"b": "gpt-4o-2024-08-06"})) == gpt4o
    assert rates_for("openai", "a", ({"a": "not-a-real-model"},)) is None


@pytest.mark.parametrize(
    "tables",
    [
        ({"a": "a"},),
        ({"a": "b", "b": "a"},),
        ({"a": "b", "b": "c", "c": "a"},),
        ({"a": "b", "b": "c", "c": "b"},),
        ({"a": "b"}, {"b": "a"}),
    ],
    ids=["self", "pair", "triangle", "tail", "across-tables"],
)
def test_an_alias_cycle_has_no_price(tables) -> None:
    assert rates_for("openai", "a", tables) is None


# -- end to end: what the wire answered, priced -----------------------------------------------


def test_guard_cost_is_the_reference_price_of_what_the_wire_answered() -> None:
    fake = FakeProvider()
    fake.script(
        Reply(input_tokens=1_200, output_tokens=80, cache_read_tokens=1_000),
        Reply(
            input_tokens=3_000, output_tokens=40, cache_read_tokens=500, cache_write_tokens=2_000
        ),
    )
    openai_client = fake.openai(max_retries=0)
    anthropic_client = fake.anthropic(max_retries=0)
    with RunGuard(max_cost_usd=5.0) as guard:
        openai_client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
        anthropic_client.messages.create(
            model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
    assert fake.wire_count == 2
    expected = reference("openai", "gpt-4o", 1_200, 80, 1_000) + reference(
        "anthropic", "claude-haiku-4-5", 3_000, 40, 500, 2_000
    )
    assert guard.usage.cost_usd == pytest.approx(expected, rel=1e-9)
    assert guard.usage.unpriced_calls == 0


def test_guard_prices_overrides_and_aliases_end_to_end() -> None:
    fake = FakeProvider(default=Reply(input_tokens=1_000, output_tokens=100))
    client = fake.openai(max_retries=0)
    prices = {"house-model": Price(input=2, output=8), "my-deployment": "gpt-4o-mini"}
    with RunGuard(max_cost_usd=1.0, prices=prices) as guard:
        for model in ("house-model", "my-deployment"):
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=100
            )
    assert [r.model for r in fake.requests] == ["house-model", "my-deployment"]
    expected = (1_000 * 2 + 100 * 8) * 1e-6 + reference("openai", "gpt-4o-mini", 1_000, 100)
    assert guard.usage.cost_usd == pytest.approx(expected, rel=1e-9)


def test_a_call_is_priced_as_the_model_the_provider_reports() -> None:
    fake = FakeProvider(default=Reply(input_tokens=1_000, output_tokens=100, model="gpt-4o"))
    client = fake.openai(max_retries=0)
    with RunGuard() as guard:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=100
        )
    assert guard.usage.cost_usd == pytest.approx(reference("openai", "gpt-4o", 1_000, 100))


def test_an_unpriced_model_is_refused_under_a_dollar_ceiling_and_free_otherwise() -> None:
    fake = FakeProvider()
    client = fake.openai(max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    with RunGuard(max_cost_usd=1.0) as priced:
        with pytest.raises(UnknownModelPrice) as info:
            client.chat.completions.create(model="mystery-1", messages=messages, max_tokens=5)
        assert not isinstance(info.value, BudgetExceeded)
        assert "mystery-1" in str(info.value)
    assert fake.wire_count == 0
    assert priced.usage.calls == 0
    with RunGuard(max_calls=5) as unpriced:
        client.chat.completions.create(model="mystery-1", messages=messages, max_tokens=5)
    assert fake.wire_count == 1
    assert unpriced.usage.cost_usd == 0.0
    assert unpriced.usage.unpriced_calls == 1


def test_genai_prices_emits_no_warnings_for_our_usage_keys() -> None:
    # the reference must understand every usage key these tests pass it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference("openai", "gpt-4o", 10, 10, 2, 1)
