"""Text generation as a generator of events: one loop for the CLI, the server and the tests.

Mirrors llama2.c run.c `generate`: the prompt (with BOS) is forced through, then tokens are sampled;
a step is one position, so `steps` counts prompt positions too; generation stops at BOS (as run.c)
or EOS. The prompt runs as one batch (its last position's logits are the ones sampled from).
"""

from dataclasses import dataclass

from .model import KVCache, Transformer
from .sampler import Sampler
from .tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class Event:
    """One printed token, or (token None) the end of generation with its finish reason."""
    token: int | None
    raw: bytes  # the bytes run.c prints for this token (its safe_printf rules applied)
    text: str  # text that is complete so far: never half a UTF-8 character
    is_prompt: bool = False  # a prompt token echoed back, as run.c prints them
    finish_reason: str | None = None  # "stop" (BOS or EOS sampled) or "length", on the last event


def resolve_steps(steps: int, seq_len: int) -> int:
    """run.c: 0 (or more than the context) means the whole context."""
    return seq_len if steps <= 0 or steps > seq_len else steps


def generate(model: Transformer, tokenizer: Tokenizer, sampler: Sampler, prompt_tokens: list,
             steps: int, cache: KVCache = None, slot: int = 0):
    """Yield an Event per printed token, then a final Event with the finish reason.

    `prompt_tokens` starts with BOS as run.c's encode gives it. Positions 0..steps-1 are run.
    """
    if not prompt_tokens:
        raise ValueError("expected at least one prompt token")
    cfg = model.config
    steps = resolve_steps(steps, cfg.seq_len)
    cache = cache if cache is not None else model.new_cache()
    cache.reset(slot)
    stream = StreamDecoder(tokenizer)
    n = len(prompt_tokens)
    forced = min(n - 1, steps)  # prompt tokens printed before the first sampled one
    for i in range(forced):
        raw, text = stream.push(prompt_tokens[i], prompt_tokens[i + 1])
        yield Event(prompt_tokens[i + 1], raw, text, is_prompt=True)
    if steps <= n - 1:
        yield Event(None, b"", stream.flush(), finish_reason="length")
        return
    logits = model.forward(prompt_tokens, cache, slot)[-1]
    token, pos = prompt_tokens[-1], n  # `pos` positions have been run
    while True:
        nxt = sampler.sample(logits)
        if nxt in (cfg.bos_id, cfg.eos_id):
            yield Event(None, b"", stream.flush(), finish_reason="stop")
            return
        raw, text = stream.push(token, nxt)
        yield Event(nxt, raw, text)
        token = nxt
        if pos >= steps:
            yield Event(None, b"", stream.flush(), finish_reason="length")
            return
        logits = model.forward([token], cache, slot)[-1]
        pos += 1
