"""Text generation as a generator of events: one loop for the CLI, the Python API and the server.

`Sequence` is one completion's state: it samples from each step's logits (through a structured-
output mask when it has a grammar), decodes the text, cuts it at stop strings and computes log
probabilities. `complete` drives it with the model's forward pass; the server's scheduler drives
the same class with batched passes, and chat.ChatSession turn by turn over one KV cache. `generate` is run.c's `generate` on top of it: the prompt
(with BOS) is forced through and echoed, then tokens are sampled; a step is one position, so
`steps` counts prompt positions too; generation stops at BOS (as run.c) or EOS. The prompt runs as
one batch (its last position's logits are the ones sampled from).
"""

from dataclasses import dataclass

import numpy as np

from .model import KVCache, Transformer
from .sampler import Sampler
from .tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class Logprob:
    """A sampled token's log probability under the model (log-softmax of the logits before
    temperature, top-p or a grammar's mask) and the `top` most likely tokens: ((id, logprob), ...)."""
    token: int
    logprob: float
    top: tuple = ()
    prev: int = -1  # the token before it (a piece's text depends on it: BOS strips a space)


@dataclass(frozen=True)
class Event:
    """One printed token, or (token None) the end of generation with its finish reason."""
    token: int | None
    raw: bytes  # the bytes run.c prints for this token (its safe_printf rules applied)
    text: str  # text that is complete so far: never half a UTF-8 character, never a stop string
    is_prompt: bool = False  # a prompt token echoed back, as run.c prints them
    finish_reason: str | None = None  # "stop" (a stop token, a stop string, the grammar done) or "length"
    logprob: Logprob | None = None  # when the request asked for log probabilities


@dataclass(frozen=True)
class Params:
    """One completion, already validated: the Python API and the server's protocol build these."""
    prompt: tuple  # token ids, BOS included when the text was encoded with it
    max_tokens: int  # sampled tokens at most; prompt + max_tokens - 1 <= seq_len
    temperature: float
    top_p: float
    seed: int  # > 0; the server draws one when the request has none
    stop: tuple = ()  # stop strings: the text ends before the first one found
    stop_tokens: frozenset = frozenset()  # sampled ids that end generation (run.c: BOS and EOS)
    skip_coins: int = 0  # coins drawn before the first sample (run.c's chat samples at prompt positions)
    grammar: object = None  # a structured.Grammar the text must match, or None
    logprobs: int | None = None  # None: no log probabilities; k: the sampled token's and the top k
    dropped_messages: int = 0  # chat: the oldest messages left out so that the prompt fits
    adapter: int = -1  # the server's: the LoRA adapter its rows run with (Transformer.adapters index; -1 none)


def resolve_steps(steps: int, seq_len: int) -> int:
    """run.c: 0 (or more than the context) means the whole context."""
    return seq_len if steps <= 0 or steps > seq_len else steps


def log_softmax(logits: np.ndarray) -> np.ndarray:  # [vocab] -> [vocab] float64
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class StopStrings:
    """Cuts a text stream before the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, text: str) -> tuple:
        """Returns (text safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.held = ""
            return buf[:min(found)], True
        keep = 0  # the longest tail of buf that is a proper prefix of a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def constraint_of(params: Params, tokenizer: Tokenizer):
    """A fresh matcher of `params.grammar` for one sequence of `params` (None without a grammar)."""
    if params.grammar is None:
        return None
    return params.grammar.constraint(params.stop_tokens, after_bos=params.prompt[-1] == tokenizer.bos_id)


class Sequence:
    """The state of one completion between forward passes: what to feed next, the sampler, the
    grammar's matcher, the text decoder and the stop strings. `advance(logits)` samples one token.

    `sampler` and `decoder` may be passed in (run.c's generate shares them with its caller);
    by default they are made from `params`. So may the grammar's matcher, `constraint` (the
    server builds it before the request reaches the scheduler: building one can take a while).
    """

    def __init__(self, params: Params, tokenizer: Tokenizer, sampler: Sampler = None,
                 decoder: StreamDecoder = None, constraint=None):
        p = self.params = params
        self.tokenizer = tokenizer
        if sampler is None:
            sampler = Sampler(tokenizer.vocab_size, p.temperature, p.top_p, p.seed)
            if p.temperature != 0:
                for _ in range(p.skip_coins):
                    sampler.rng.f32()
        self.sampler = sampler
        self.feed = list(p.prompt)  # tokens of the next pass: the prompt, then one token at a time
        self.prefilled = False
        self.last = p.prompt[-1]
        self.generated = 0
        self.stop_token = None  # the stop token that ended the sequence, if one did
        self.decoder = decoder or StreamDecoder(tokenizer)
        self.stops = StopStrings(p.stop)
        self.constraint = constraint
        if constraint is None and p.grammar is not None:  # its first mask is computed while the prompt runs
            self.constraint = constraint_of(p, tokenizer)

    def advance(self, logits: np.ndarray) -> list:  # [vocab] float32
        """Sample from this step's logits; returns the events, the last with a finish_reason when
        the sequence is done (else the sampled token is fed next step)."""
        return self.take(logits, self.sampler.sample(self.allowed(logits)))

    def allowed(self, logits: np.ndarray) -> np.ndarray:  # [vocab] -> [vocab]
        """The logits the next token is chosen from: the grammar's mask applied, if any."""
        return logits if self.constraint is None else self.constraint.mask(logits)

    def take(self, logits: np.ndarray, nxt: int) -> list:
        """Emit `nxt`, chosen from this step's `allowed(logits)` (by `advance`, or by speculative
        decoding's acceptance rule); returns the events as `advance` does."""
        p = self.params
        self.prefilled = True
        if nxt in p.stop_tokens:
            self.stop_token = nxt
            return [self.finish("stop")]
        logprob = None if p.logprobs is None else self._logprob(logits, nxt)
        if self.constraint is not None:
            self.constraint.advance(nxt)
        raw, text = self.decoder.push(self.last, nxt)
        self.generated += 1
        self.last, self.feed = nxt, [nxt]
        text, hit = self.stops.push(text)
        event = Event(nxt, raw, text, logprob=logprob)
        if hit:
            return [event, Event(None, b"", "", finish_reason="stop")]
        if self.constraint is not None and self.constraint.done:
            return [event, self.finish("stop")]  # the grammar admits nothing more but its end
        if self.generated >= p.max_tokens:
            return [event, self.finish("length")]
        return [event]

    def _logprob(self, logits, token) -> Logprob:
        lp = log_softmax(logits)
        k = min(self.params.logprobs, len(lp))
        top = ()
        if k > 0:
            best = np.argpartition(-lp, k - 1)[:k]
            best = best[np.lexsort((best, -lp[best]))]  # most likely first, lower id on ties
            top = tuple((int(i), float(lp[i])) for i in best)
        return Logprob(int(token), float(lp[token]), top, int(self.last))

    def finish(self, reason: str) -> Event:
        """End the sequence now (`reason`: "stop" or "length"); the last event: the text still held
        back (cut at a stop string it completes)."""
        self.close()
        text, hit = self.stops.push(self.decoder.flush())
        if hit:
            return Event(None, b"", text, finish_reason="stop")
        return Event(None, b"", text + self.stops.flush(), finish_reason=reason)

    def close(self):
        """Release the grammar's matcher (waits for a mask still being computed)."""
        if self.constraint is not None:
            self.constraint.close()


def complete(model: Transformer, params: Params, tokenizer: Tokenizer, cache: KVCache = None,
             slot: int = 0, sampler: Sampler = None, decoder: StreamDecoder = None, speculator=None):
    """Yield the Events of one completion of `params.prompt` (not echoed), the last one with the
    finish reason: the prompt as one pass, then a pass per sampled token, or with `speculator` (a
    speculative.Speculator) a pass per verified draft."""
    seq = Sequence(params, tokenizer, sampler, decoder)
    cache = cache if cache is not None else model.new_cache()
    cache.reset(slot)
    drafting = speculator.start(params, slot) if speculator is not None else None
    try:
        while True:
            if drafting is None:
                events = seq.advance(model.forward(seq.feed, cache, slot)[-1])
            elif not seq.prefilled:  # the prompt's pass: nothing drafted yet
                events = drafting.plain(seq, model.forward(seq.feed, cache, slot)[-1])
            else:
                events = drafting.step(model, cache, seq)
            yield from events
            if events[-1].finish_reason is not None:
                return
    finally:
        seq.close()


def generate(model: Transformer, tokenizer: Tokenizer, sampler: Sampler, prompt_tokens: list,
             steps: int, cache: KVCache = None, slot: int = 0, grammar=None, speculator=None):
    """run.c's generate: yield an Event per printed token (prompt tokens echoed first), then a
    final Event with the finish reason. `prompt_tokens` starts with BOS as run.c's encode gives it.
    Positions 0..steps-1 are run. With `grammar` (a structured.Grammar) the sampled text matches it;
    with `speculator` (a speculative.Speculator) tokens are drafted and verified.
    """
    if not prompt_tokens:
        raise ValueError("expected at least one prompt token")
    cfg = model.config
    steps = resolve_steps(steps, cfg.seq_len)
    stream = StreamDecoder(tokenizer)
    n = len(prompt_tokens)
    forced = min(n - 1, steps)  # prompt tokens printed before the first sampled one
    for i in range(forced):
        raw, text = stream.push(prompt_tokens[i], prompt_tokens[i + 1])
        yield Event(prompt_tokens[i + 1], raw, text, is_prompt=True)
    if steps <= n - 1:
        yield Event(None, b"", stream.flush(), finish_reason="length")
        return
    params = Params(tuple(prompt_tokens), max_tokens=steps - n + 1, temperature=sampler.temperature,
                    top_p=sampler.top_p, seed=sampler.seed,
                    stop_tokens=frozenset({cfg.bos_id, cfg.eos_id} | tokenizer.end_ids), grammar=grammar)
    yield from complete(model, params, tokenizer, cache, slot, sampler, stream, speculator)
