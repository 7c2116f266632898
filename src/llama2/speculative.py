"""Speculative decoding: a cheap proposer guesses the next k tokens, one pass of the target over the
k+1 rows (the token to feed, then the guesses) checks them, and the acceptance rule keeps the
target's output distribution exactly.

    accept(sampler, logits, token, q)   the rule at one drafted position (Leviathan et al. 2023,
                                        "Fast Inference from Transformers via Speculative Decoding";
                                        Chen et al. 2023, "Accelerating Large Language Model Decoding
                                        with Speculative Sampling"): keep the drafted x with probability
                                        min(1, p(x)/q(x)), else draw from norm(max(0, p - q))
    DraftModel                          proposals sampled from a smaller model with the same
                                        vocabulary; a KV slot per sequence, rolled back to the accepted
                                        text; every asking sequence's draft step in one batched pass
    PromptLookup                        proposals copied from the text itself: the tokens that followed
                                        the latest earlier occurrence of the last n tokens (prompt lookup
                                        decoding, Saxena 2023; llama.cpp's and llama-cpp-python's)
    Costs, DraftLength                  how many tokens to draft next, from the measured costs of the
                                        passes and the acceptance so far: backs off to plain decoding
                                        when the guesses do not pay for themselves
    Speculator                          a proposer and its settings; `start` gives a sequence's Drafting

At temperature 0 p and q are one-hot, a guess is kept exactly when it is the target's argmax and the
replacement is that argmax: the output is plain greedy decoding's, token for token, because a pass of
at most `Transformer.invariant_rows` rows gives each row the bits it gets alone (drafts are capped so).
Grammar masks, stop strings and logprobs apply per emitted token through generate.Sequence, in order,
exactly as in plain decoding. A sampled sequence keeps the target's distribution but draws its coins
in another order, so a seed gives other (equally distributed) text than without a draft.
"""

import time
from dataclasses import dataclass

import numpy as np

from .errors import FormatError, UsageError
from .sampler import Sampler, sample_multinomial

# A verification pass's cost per extra row, in decode steps of the target, until measured: a decode
# step reads every weight once and the extra rows reuse what was read, so they cost little while the
# products stay memory-bound. Costs measured as the passes run replace it (Costs).
ROW_COST = 0.1
PRIOR_ACCEPTANCE = 0.6  # the acceptance rate assumed before any draft was checked
PROBE_SHARE = 0.02  # at most this share of the time goes to re-trying drafts that did not pay
MAX_DRAFT = 8  # the longest draft by default (also capped by the target's invariant rows)
QUIET_STEPS = 16  # plain steps a weighing that chose plain decoding holds for (DraftLength.quiet)
SPIKE = 4.0  # a measured pass counts as at most this many times its average so far
# A draft model left behind by more than this many tokens of plain decoding restarts from the text's
# last DRAFT_WINDOW tokens: catching up on all of them would cost the draft's prompt speed for every
# token decoded plainly, however rarely drafts are re-tried, and no re-try spacing could bound it.
DRAFT_WINDOW = 32
# What feeding one token of that catch-up costs, in draft steps (a fixed estimate, not measured per
# pair): a prompt pass's row reuses the weights the pass reads (measured: a stories260K-sized draft
# 0.23; a TinyLlama Q4_0 one about 0.2). A draft re-tried after a plain stretch pays its catch-up
# first: TinyLlama Q8_0 with a Q4_0 draft, 32 tokens of it cost 7 target steps, where the draft step
# and the 2-row pass alone made a probe look like 1.6.
CATCH_UP_ROW = 0.25


def accept(sampler: Sampler, logits: np.ndarray, token: int, q=None) -> tuple:
    """The target's choice at a drafted position: (token, True) keeps the draft's `token`, else
    (replacement, False). `logits`: the target's [vocab] at that position (grammar mask applied);
    `q`: the distribution the draft drew `token` from ([vocab]), None for a deterministic proposal
    (one-hot). Greedy samplers keep a guess iff it is the argmax (no coin drawn)."""
    if sampler.greedy:
        best = sampler.sample(logits)
        return best, best == token
    p = sampler.distribution(logits)
    qx = 1.0 if q is None else float(q[token])
    if sampler.rng.f32() * qx < p[token]:
        return token, True
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0:  # p <= q nowhere below: only rounding gets here; p is the distribution to keep
        residual, total = p, p.sum()
    return sample_multinomial((residual / total).astype(np.float32), sampler.rng.f32()), False


@dataclass
class Draft:
    """Proposed tokens and, for sampled proposals, the distribution each was drawn from."""
    tokens: list
    probs: list = None  # [vocab] per token, or None: deterministic proposals (q one-hot)

    def q(self, i):
        return None if self.probs is None else self.probs[i]


@dataclass
class Ask:
    """One sequence's request for a draft: its KV slot, its text so far (the last token is the one
    fed next), how many tokens, the draft's own sampler, and how many tokens were decoded plainly
    since its last draft."""
    slot: int
    context: list
    k: int
    sampler: Sampler = None
    plain_run: int = 0


def _same_vocabulary(target, draft) -> str:
    """Why the draft's tokenizer cannot stand for the target's ("" if it can)."""
    if draft.vocab_size != target.vocab_size:
        return f"{draft.vocab_size} tokens, the model has {target.vocab_size}"
    for i, (a, b) in enumerate(zip(target.pieces, draft.pieces)):
        if a != b:
            return f"token {i} is {b!r}, the model's is {a!r}"
    if (draft.bos_id, draft.eos_id) != (target.bos_id, target.eos_id):
        return f"BOS/EOS ids {draft.bos_id}/{draft.eos_id}, the model's are {target.bos_id}/{target.eos_id}"
    return ""


def _weight_bytes(model) -> int:
    return sum(m.nbytes for m in model.matrices())


class DraftModel:
    """A smaller model proposing tokens for sequences in `slots` KV slots (a slot's number is the
    target's). `cost`: a draft step in target decode steps, from the weight bytes each reads."""

    def __init__(self, model, target, slots: int = 1):
        self.model = model
        self.cache = model.new_cache(slots)
        self.fed = [[] for _ in range(slots)]  # the tokens each slot's keys and values hold: its
        self.start = [0] * slots  # sequence's text from here on (DRAFT_WINDOW)
        self.cost = _weight_bytes(model) / max(1, _weight_bytes(target))

    @classmethod
    def checked(cls, draft, target, slots: int = 1) -> "DraftModel":
        """The DraftModel of a loaded `draft` Llama for a `target` Llama; FormatError naming the
        draft's file when its vocabulary differs from the target's."""
        why = _same_vocabulary(target.tokenizer, draft.tokenizer)
        if not why and draft.config.vocab_size != target.config.vocab_size:
            why = f"{draft.config.vocab_size} logits, the model has {target.config.vocab_size}"
        if why:
            raise FormatError(f"{draft.path}: the draft's vocabulary differs from the model's ({why})")
        return cls(draft.model, target.model, slots)

    def release(self, slot: int):
        self.cache.reset(slot)
        self.fed[slot], self.start[slot] = [], 0

    @staticmethod
    def behind(plain_run: int) -> int:
        """Tokens a sequence's next draft feeds before its first guess, after `plain_run` tokens
        decoded plainly (at most DRAFT_WINDOW: further behind, the slot restarts from a window)."""
        return min(plain_run, DRAFT_WINDOW)

    def propose(self, asks: list) -> list:
        """A Draft for each Ask: every asking sequence's draft position runs in one batched pass."""
        seq_len = self.cache.seq_len
        drafts = [Draft([], []) for _ in asks]
        feeds = []
        for a in asks:
            fed, start = self.fed[a.slot], self.start[a.slot]
            if a.plain_run > DRAFT_WINDOW:
                start = self.start[a.slot] = max(0, len(a.context) - DRAFT_WINDOW)
                del fed[:]
            n = 0
            while n < min(len(fed), len(a.context) - start - 1) and fed[n] == a.context[start + n]:
                n += 1
            if self.model.config.sliding_window and n < self.cache.pos[a.slot] - self.cache.rollback:
                n = 0  # further back than a sliding window keeps: the slot starts again
            self.cache.truncate(a.slot, n)  # the slot keeps the text it shares with the context
            del fed[n:]
            a.k = min(a.k, seq_len - (len(a.context) - start) + 1)  # the draft's own context is the limit
            feeds.append(list(a.context[start + n:]))
        active = [i for i, a in enumerate(asks) if a.k > 0]
        while active:
            logits = self.model.forward_batch([(asks[i].slot, feeds[i]) for i in active], self.cache)
            for i, row in zip(active, logits):
                a, d = asks[i], drafts[i]
                self.fed[a.slot].extend(feeds[i])
                if a.sampler.greedy:
                    token, q = a.sampler.sample(row), None
                else:
                    q = a.sampler.distribution(row)
                    token = sample_multinomial(q.astype(np.float32), a.sampler.rng.f32())
                d.tokens.append(token)
                d.probs.append(q)
                feeds[i] = [token]
            active = [i for i in active if len(drafts[i].tokens) < asks[i].k]
        return drafts


class PromptLookup:
    """Proposals from the text so far: after the latest earlier occurrence of its last n tokens
    (n from `ngram` down to 1), the tokens that followed. Costs nothing next to a model's step."""
    cost = 0.0

    def __init__(self, ngram: int):
        if ngram < 1:
            raise UsageError(f"--lookup {ngram}: expected an n-gram size of at least 1")
        self.ngram = ngram

    def release(self, slot: int):
        pass

    @staticmethod
    def behind(plain_run: int) -> int:
        return 0  # the text itself is the proposer's whole state

    def propose(self, asks: list) -> list:
        return [Draft(self.lookup(a.context, a.k)) for a in asks]

    def lookup(self, context, k: int) -> list:
        L = len(context)
        if k <= 0:
            return []
        for n in range(min(self.ngram, L - 1), 0, -1):
            tail = context[L - n:]
            for i in range(L - n - 1, -1, -1):  # latest first
                if context[i:i + n] == tail:
                    return list(context[i + n:i + n + k])
        return []


class Costs:
    """Seconds of the target's passes by their rows, and of the proposer's passes, as measured
    (exponential averages): what DraftLength weighs guesses against. Shared by a Speculator's
    sequences (the server's slots record their batched passes here)."""

    def __init__(self, proposer_cost: float):
        self.proposer_cost = proposer_cost  # a proposer pass in target decode steps until measured
        self.passes = {}  # rows -> seconds
        self.draft = None  # seconds of one proposer pass (one guess per sequence)

    @staticmethod
    def _ema(old, new):
        return new if old is None else 0.8 * old + 0.2 * new

    def record_pass(self, rows: int, seconds: float):
        old = self.passes.get(rows)
        if old is not None:  # a pass the OS preempted (busy machine) moves the average a step at most
            seconds = min(seconds, SPIKE * old)
        self.passes[rows] = self._ema(old, seconds)

    def record_draft(self, passes: int, seconds: float, behind: int = 0):
        """`passes` proposer passes that first fed `behind` tokens of catch-up (CATCH_UP_ROW each)."""
        if passes:
            self.draft = self._ema(self.draft, seconds / (passes + CATCH_UP_ROW * behind))

    def pass_time(self, rows: int):
        """Measured, or estimated from the largest measured smaller pass (ROW_COST a row); None
        before any pass of at most `rows` rows was measured."""
        below = [r for r in self.passes if r <= rows]
        if not below:
            return None
        r = max(below)
        return self.passes[r] * (1 + ROW_COST * (rows - r) / r)

    def draft_time(self, base: float) -> float:
        return self.draft if self.draft is not None else self.proposer_cost * base


class DraftLength:
    """The draft length for the next step: the k in 0..`most` that maximizes expected tokens per
    second, E(k) / T(k), with E(k) = (1 - a^(k+1)) / (1 - a) tokens a step when each guess is kept
    with probability a (an exponential average of what was kept so far), and T(k) = k proposer
    passes + a target pass of base + k rows, from `costs` (measured; k grows a row at a time beyond
    the largest pass measured). k = 0 is plain decoding; while
    there, a one-guess draft is re-tried (a probe) once the time since the last try makes its cost at
    most PROBE_SHARE of it, and only what the probes keep moves the estimate back up, so a pair that
    does not pay costs about that much. (An estimate that drifted back toward its prior by itself
    re-tried a nearly free draft every few steps: 8% slower than plain decoding on TinyLlama Q8_0
    with a random-weight draft.) `adaptive=False`: always `most` (tests, and users who know their pair).

    Measured costs make the lengths, so a sampled (seeded) completion may draw its coins in another
    order from run to run; its distribution is the target's whatever the lengths (greedy output
    never changes)."""

    def __init__(self, most: int, costs: Costs, adaptive: bool = True):
        self.most, self.costs, self.adaptive = most, costs, adaptive
        self.rate = PRIOR_ACCEPTANCE
        self.idle = 0.0  # seconds of plain decoding since drafting last paid or was tried
        # (steps, base, t1, a probe's seconds, and per token of catch-up): plain steps left before
        # the next full weighing, and what it found. At k = 0 the estimate does not move and the
        # costs move slowly, so a weighing holds for a few steps; skipping it keeps the policy's own
        # cost per plain step under a microsecond, which the smallest models' steps (80 us) notice.
        self.quiet = (0, 0, 0.0, 0.0, 0.0)

    def next(self, base: int = 1, behind: int = 0) -> int:
        """The draft length of the next step; `base`: the pass' other rows; `behind`: the tokens the
        proposer feeds before its first guess (DraftModel.behind)."""
        if not self.adaptive:
            return self.most
        steps, quiet_base, t1, probe, per_token = self.quiet
        if steps and base == quiet_base:
            self.idle += t1
            if probe + per_token * behind <= PROBE_SHARE * self.idle:
                self.quiet, self.idle = (0, 0, 0.0, 0.0, 0.0), 0.0
                return 1
            self.quiet = (steps - 1, base, t1, probe, per_token)
            return 0
        self.quiet = (0, 0, 0.0, 0.0, 0.0)
        t1 = self.costs.pass_time(base)
        if t1 is None:
            return 0  # measure a plain step first
        draft = self.costs.draft_time(t1)
        catch_up = CATCH_UP_ROW * draft * behind
        a, best, best_k = min(self.rate, 0.999), 1.0 / t1, 0
        # one row more than the largest pass measured: a pass dearer than thought is found out
        # at the smallest cost
        for k in range(1, min(self.most, max(self.costs.passes) - base + 1) + 1):
            gain = (1 - a ** (k + 1)) / (1 - a) / (catch_up + k * draft + self.costs.pass_time(base + k))
            if gain > best * 1.001:
                best, best_k = gain, k
        if best_k:
            self.idle = 0.0
            return best_k
        self.idle += t1
        probe = draft + self.costs.pass_time(base + 1)
        if probe + catch_up <= PROBE_SHARE * self.idle:
            self.idle = 0.0
            return 1
        self.quiet = (QUIET_STEPS, base, t1, probe, CATCH_UP_ROW * draft)
        return 0

    def update(self, proposed: int, kept: int):
        if proposed:
            self.rate = 0.7 * self.rate + 0.3 * kept / proposed


class Speculator:
    """A proposer (DraftModel or PromptLookup) with its settings: `most` tokens a draft at most
    (capped so that a verification pass holds at most the target's invariant rows), `adaptive`
    length (DraftLength)."""

    def __init__(self, proposer, target_model, most: int = MAX_DRAFT, adaptive: bool = True):
        if most < 1:
            raise UsageError(f"--draft-max {most}: expected at least 1")
        self.proposer = proposer
        self.most = max(1, min(most, target_model.invariant_rows - 1))
        if isinstance(proposer, DraftModel):  # its own guesses are taken back too
            proposer.cache.rollback = self.most
        self.adaptive = adaptive
        self.vocab = target_model.config.vocab_size
        self.costs = Costs(proposer.cost)
        self.steps = self.proposed = self.kept = 0  # over every sequence: passes, guesses, guesses kept

    @property
    def acceptance(self) -> float:
        """The share of guesses kept so far."""
        return self.kept / self.proposed if self.proposed else 0.0

    def start(self, params, slot: int = 0, context=None) -> "Drafting":
        """A sequence's drafting state; its draft sampler is seeded from the request's seed.
        `context`: the whole text the slot continues (a chat's earlier turns, then params.prompt),
        whose common start the draft's cache keeps; None: params.prompt, a new sequence."""
        if context is None:
            self.proposer.release(slot)
            context = params.prompt
        seed = (params.seed * 0x9E3779B97F4A7C15 + 1) & ((1 << 63) - 1) or 1  # not the target's coins
        return Drafting(self, slot, list(context), Sampler(self.vocab, params.temperature, params.top_p, seed))


class Drafting:
    """One sequence's speculative state: its text so far, its draft length policy and sampler."""

    def __init__(self, speculator: Speculator, slot: int, context: list, sampler: Sampler):
        self.speculator, self.slot, self.context, self.sampler = speculator, slot, context, sampler
        self.length = DraftLength(speculator.most, speculator.costs, speculator.adaptive)
        self.plain_run = 0  # tokens decoded plainly since the last draft (DraftModel's window)

    def ask(self, room: int, base: int = 1):
        """The Ask for this step's draft (None: decode plainly): `room` positions are left; `base`:
        the rows of the pass besides this sequence's guesses."""
        k = min(self.length.next(base, self.speculator.proposer.behind(self.plain_run)), room)
        return Ask(self.slot, self.context, k, self.sampler, self.plain_run) if k > 0 else None

    def settle(self, seq, rows: np.ndarray, draft: Draft) -> tuple:
        """Emit the tokens of one verification pass: `rows` [1 + len(draft.tokens), vocab] are the
        target's logits after seq.feed and after each guess. Returns (events, guesses kept); the
        target's cache must then keep exactly 1 + kept of the pass' positions."""
        events, kept = [], 0
        for i, row in enumerate(rows):
            allowed = seq.allowed(row)
            if i < len(draft.tokens):
                token, ok = accept(seq.sampler, allowed, draft.tokens[i], draft.q(i))
            else:
                token, ok = seq.sampler.sample(allowed), False
            kept += ok
            out = seq.take(row, token)
            events += out
            if out[-1].token is not None:
                self.context.append(token)
            if out[-1].finish_reason is not None or not ok:
                break
        sp = self.speculator
        sp.steps, sp.proposed, sp.kept = sp.steps + 1, sp.proposed + len(draft.tokens), sp.kept + kept
        self.plain_run = 0
        self.length.update(len(draft.tokens), kept)
        return events, kept

    def plain(self, seq, logits) -> list:
        """A step without a draft (the policy chose none, or the proposer had none)."""
        events = seq.advance(logits)
        if events[0].token is not None:
            self.context.append(events[0].token)
        self.speculator.steps += 1
        self.plain_run += 1
        return events

    def step(self, model, cache, seq) -> list:
        """One step of a sequence alone (after its prompt pass): draft, verify, roll back."""
        slot, costs = self.slot, self.speculator.costs
        start = int(cache.pos[slot])
        a = self.ask(min(cache.seq_len - start - 1, seq.params.max_tokens - seq.generated - 1))
        draft = None
        if a is not None:
            proposer = self.speculator.proposer
            t0 = time.perf_counter()
            draft = proposer.propose([a])[0]
            costs.record_draft(len(draft.tokens), time.perf_counter() - t0, proposer.behind(a.plain_run))
        t0 = time.perf_counter()
        if draft is None or not draft.tokens:
            logits = model.forward(seq.feed, cache, slot)[-1]
            costs.record_pass(1, time.perf_counter() - t0)
            return self.plain(seq, logits)
        cache.rollback = max(cache.rollback, self.speculator.most)  # rejected rows are taken back
        rows = model.forward(seq.feed + draft.tokens, cache, slot, all_logits=True)
        costs.record_pass(len(rows), time.perf_counter() - t0)
        events, kept = self.settle(seq, rows, draft)
        cache.truncate(slot, start + 1 + kept)
        return events
