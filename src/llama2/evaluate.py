"""Perplexity of a model on text, scored by our inference engine (`Llama.logits`), no torch needed.

The text is encoded story by story (BOS before each, as `llama2 data prepare` does), concatenated,
and scored in consecutive windows of seq_len predictions; every token after the first is predicted
once, with the context available inside its window (so the figure is a little pessimistic).
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Score:
    tokens: int  # number of predicted tokens
    loss: float  # mean negative log-likelihood per token, in nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def log_softmax(logits):  # [T, V] -> [T, V], in float64 for an exact sum over many tokens
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(llama, ids, max_tokens: int = 0, progress=None) -> Score:
    """Mean NLL of ids[1:] given their prefixes within windows of the model's context length."""
    from tqdm import tqdm

    ids = list(ids)
    if max_tokens:
        ids = ids[: max_tokens + 1]
    window = llama.config.seq_len
    total, count = 0.0, 0
    starts = range(0, max(len(ids) - 1, 0), window)
    for start in tqdm(starts, desc="scoring", unit="window", leave=False,
                      disable=None if progress is None else not progress):
        chunk = ids[start:start + window + 1]
        logp = log_softmax(llama.logits(chunk[:-1]))
        targets = np.asarray(chunk[1:])
        total -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return Score(count, total / count if count else math.nan)
