"""Exact sampler behaviour: run.c's RNG, greedy, multinomial and top-p on hand-made distributions."""

import numpy as np
import pytest

from llama2.sampler import Rng, Sampler, sample_multinomial, sample_top_p, softmax


def test_xorshift_matches_run_c():
    # Values printed by run.c's random_u32 / random_f32 compiled with gcc (seeds 42 and 133742).
    r = Rng(42)
    assert [r.u32() for _ in range(4)] == [1456360119, 3359763283, 3393612768, 4054632243]
    r = Rng(133742)
    got = [r.f32() for _ in range(4)]
    assert got == pytest.approx([0.706299007, 0.622677088, 0.538505733, 0.532580435], abs=1e-9)


PROBS = np.array([0.125, 0.125, 0.25, 0.5], np.float32)


@pytest.mark.parametrize("coin,expected", [(0.0, 0), (0.124, 0), (0.125, 1), (0.2499, 1), (0.25, 2),
                                           (0.4999, 2), (0.5, 3), (0.9999, 3)])
def test_multinomial_picks_first_cdf_above_coin(coin, expected):
    assert sample_multinomial(PROBS, coin) == expected


@pytest.mark.parametrize("coin,expected", [(0.0, 3), (0.5, 3), (0.66, 3), (0.67, 2), (0.99, 2)])
def test_top_p_truncates_where_cumulative_exceeds_p(coin, expected):
    # sorted: 0.5 (id 3), 0.25 (id 2) -> cumulative 0.75 > 0.5 stops there; the 0.125s are cut
    # (and fall below the (1-p)/(n-1) pre-filter anyway); r = coin * 0.75 picks within the nucleus.
    assert sample_top_p(PROBS, 0.5, coin) == expected


def test_top_p_keeps_everything_when_needed():
    probs = np.array([0.25, 0.25, 0.25, 0.25], np.float32)
    # cumulative never exceeds 0.99 before the last token: all four are kept, stable order.
    assert [sample_top_p(probs, 0.99, c) for c in (0.1, 0.3, 0.6, 0.9)] == [0, 1, 2, 3]


def test_temperature_zero_is_argmax_and_draws_no_coin():
    s = Sampler(4, temperature=0.0, top_p=0.9, seed=7)
    state = s.rng.state
    assert s.sample(np.array([0.1, 3.0, 2.0, -1.0], np.float32)) == 1
    assert s.rng.state == state


def test_one_coin_per_sampled_token():
    logits = np.log(PROBS)
    for top_p in (0.0, 0.5, 1.0):
        s = Sampler(4, temperature=1.0, top_p=top_p, seed=42)
        ref = Rng(42)
        for _ in range(5):
            s.sample(logits)
            ref.u32()
        assert s.rng.state == ref.state


def test_sampling_follows_coins_exactly():
    logits = np.log(PROBS)
    s = Sampler(4, temperature=1.0, top_p=0.0, seed=42)
    coins = Rng(42)
    for _ in range(20):
        assert s.sample(logits) == sample_multinomial(softmax(logits), coins.f32())


def test_softmax_handles_huge_logits():
    p = softmax(np.array([1e30, 1e30, -1e30], np.float32))
    assert np.allclose(p, [0.5, 0.5, 0.0]) and np.isfinite(p).all()


def test_seed_zero_means_clock():
    assert Sampler(4, seed=0).seed > 0 and Sampler(4, seed=-3).seed > 0
    assert Sampler(4, seed=5).seed == 5


# -- every accepted temperature is defined (issue 13, case 4) --------------------------------------

LOGITS = (np.random.default_rng(0).standard_normal(512) * 3).astype(np.float32)


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-30, 1e-46])
@pytest.mark.parametrize("top_p", [0.0, 0.9, 1.0, 1e-40])
def test_tiny_temperatures_pick_the_most_likely_token(temperature, top_p):
    # logits / 1e-38 overflows float32 (run.c then samples from NaNs); the limit is the argmax.
    s = Sampler(len(LOGITS), temperature, top_p, seed=42)
    assert [s.sample(LOGITS) for _ in range(8)] == [int(np.argmax(LOGITS))] * 8


def test_tiny_temperature_shares_exact_ties():
    logits = np.array([1.0, 5.0, 5.0, -2.0], np.float32)
    s = Sampler(4, 1e-38, 1.0, seed=42)
    got = {s.sample(logits) for _ in range(64)}
    assert got == {1, 2}


@pytest.mark.parametrize("top_p", [0.0, 1.0])
def test_infinite_temperature_is_uniform(top_p):
    s, coins = Sampler(len(LOGITS), float("inf"), top_p, seed=42), Rng(42)
    uniform = np.full(len(LOGITS), 1 / len(LOGITS), np.float32)
    for _ in range(16):
        assert s.sample(LOGITS) == sample_multinomial(uniform, coins.f32())


def test_tiny_top_p_keeps_the_most_likely_token():
    assert Sampler(len(LOGITS), 1.0, 1e-40, seed=3).sample(LOGITS) == int(np.argmax(LOGITS))
    # near-uniform: run.c's (1-p)/(n-1) pre-filter drops every token; the nucleus is the first one
    uniform = np.full(512, 1 / 512, np.float32)
    assert sample_top_p(uniform, 1e-40, 0.7) == 0
    assert Sampler(512, float("inf"), 1e-40, seed=3).sample(LOGITS) == 0


@pytest.mark.parametrize("temperature,top_p", [(float("nan"), 0.9), (-1.0, 0.9), (1.0, float("nan"))])
def test_nan_and_negative_settings_are_refused(temperature, top_p):
    with pytest.raises(ValueError):
        Sampler(4, temperature, top_p)
