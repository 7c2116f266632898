"""Token sampling exactly as llama2.c's run.c: xorshift64* coins, temperature, top-p (nucleus).

Order of operations (run.c `sample`): temperature 0 means greedy argmax. Otherwise the logits are
divided by the temperature, turned into probabilities by a float32 softmax, one coin is drawn per
sampled token, and the token is drawn from the full distribution when top_p <= 0 or top_p >= 1, else
from the smallest set of most-likely tokens whose cumulative probability exceeds top_p.

Every temperature >= 0 is defined, where run.c's arithmetic breaks down too (it never does for the
golden cases, whose bytes are unchanged): a temperature that is 0 as a float32 (below 1.4e-45) is
greedy, as run.c's `temperature == 0.0f`; when logits / temperature overflows float32 (a tiny
temperature) the softmax is taken of (logits - max) / temperature instead, its limit: the most
likely token (ties shared equally); an infinite temperature gives the uniform distribution. Top-p
always keeps the most likely token, even when run.c's (1-p)/(n-1) pre-filter would drop every token
(a near-uniform distribution and a tiny p). NaN is refused.
"""

import math

import time

import numpy as np

_MASK64 = (1 << 64) - 1


class Rng:
    """run.c's xorshift64* generator; the state is a uint64 seeded with the seed itself."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & _MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & _MASK64) >> 32

    def f32(self) -> float:
        """A float32 in [0, 1): the top 24 bits of a u32."""
        return float(np.float32(self.u32() >> 8) / np.float32(16777216.0))


def resolve_seed(seed) -> int:
    """run.c: a seed of 0 or less (or none) means "from the clock"."""
    if seed is None or seed <= 0:
        return int(time.time())
    return int(seed)


def softmax(x: np.ndarray) -> np.ndarray:  # [n] float32 -> [n] float32
    e = np.exp(x - x.max(), dtype=np.float32)
    total = np.cumsum(e, dtype=np.float32)[-1]  # a sequential sum, as run.c's loop
    return e / total


def sample_multinomial(probs: np.ndarray, coin: float) -> int:  # [n], coin in [0,1)
    """First index whose cumulative probability exceeds the coin (run.c sample_mult)."""
    cdf = np.cumsum(probs, dtype=np.float32)
    i = int(np.searchsorted(cdf, np.float32(coin), side="right"))
    return min(i, len(probs) - 1)


def nucleus(probs: np.ndarray, top_p: float) -> tuple:  # [n], p -> (kept ids, their cumulative probability)
    """run.c sample_topp's nucleus: tokens below (1-p)/(n-1) are dropped up front (they cannot be in
    it), the rest sorted by descending probability and cut where the cumulative probability first
    exceeds p. Returns the kept ids, most likely first, and the float32 cumulative sums over them."""
    n = len(probs)
    cutoff = (np.float32(1.0) - np.float32(top_p)) / np.float32(max(n - 1, 1))
    idx = np.flatnonzero(probs >= cutoff)
    if len(idx) == 0:  # every token below the cutoff (near-uniform, tiny p): keep them all
        idx = np.arange(n)
    order = idx[np.argsort(-probs[idx], kind="stable")]
    cum = np.cumsum(probs[order], dtype=np.float32)
    over = np.flatnonzero(cum > np.float32(top_p))
    last = int(over[0]) if len(over) else len(order) - 1
    return order[: last + 1], cum[: last + 1]


def sample_top_p(probs: np.ndarray, top_p: float, coin: float) -> int:  # [n], p, coin -> index
    """Nucleus sampling as run.c sample_topp: the coin is scaled by the nucleus' mass."""
    kept, cum = nucleus(probs, top_p)
    r = np.float32(coin) * cum[-1]
    j = int(np.searchsorted(cum, r, side="right"))
    return int(kept[min(j, len(kept) - 1)])


class Sampler:
    """Owns its RNG. `sample(logits)` returns a token id; the logits array is not modified."""

    def __init__(self, vocab_size: int, temperature: float = 1.0, top_p: float = 0.9, seed=None):
        temperature, top_p = float(temperature), float(top_p)
        if math.isnan(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature}")
        if math.isnan(top_p):
            raise ValueError("top_p must be a number, got nan")
        self.vocab_size = vocab_size
        self.temperature = temperature
        self.top_p = top_p
        self.seed = resolve_seed(seed)
        self.rng = Rng(self.seed)

    @property
    def greedy(self) -> bool:
        """Temperature 0 as a float32 (run.c's `temperature == 0.0f`): argmax, no coin drawn."""
        with np.errstate(over="ignore"):
            return np.float32(self.temperature) == 0

    def _probs(self, logits):  # [vocab] -> float32 [vocab]: the softmax of logits / temperature
        with np.errstate(over="ignore"):
            t = np.float32(self.temperature)  # beyond float32's range: inf
        logits = logits.astype(np.float32)
        with np.errstate(over="ignore"):
            scaled = logits / t
        if not np.isfinite(scaled.max()):  # overflow: softmax's limit, computed without it
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                scaled = np.nan_to_num((logits - logits.max()) / t, nan=0.0, neginf=-np.inf)
        return softmax(scaled)

    def sample(self, logits: np.ndarray) -> int:  # [vocab] float32
        if self.greedy:
            return int(np.argmax(logits))
        probs = self._probs(logits)
        coin = self.rng.f32()
        if self.top_p <= 0 or self.top_p >= 1:
            return sample_multinomial(probs, coin)
        return sample_top_p(probs, self.top_p, coin)

    def distribution(self, logits: np.ndarray) -> np.ndarray:  # [vocab] float32 -> [vocab] float64
        """The probabilities `sample` draws each token with (greedy: one-hot at the argmax; top-p:
        the nucleus renormalized). Speculative decoding's acceptance rule needs them exactly."""
        if self.greedy:
            p = np.zeros(len(logits))
            p[int(np.argmax(logits))] = 1.0
            return p
        probs = self._probs(logits).astype(np.float64)
        if self.top_p <= 0 or self.top_p >= 1:
            return probs / probs.sum()
        kept, _ = nucleus(probs.astype(np.float32), self.top_p)
        p = np.zeros(len(probs))
        p[kept] = probs[kept]
        return p / p.sum()
