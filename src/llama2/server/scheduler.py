"""Continuous batching: one thread owns the model and runs the active sequences together.

The KV cache is one pool of blocks (llama2.kvcache) sized by a token budget, shared by all
sequences, each with its own block table. A request is admitted when a sequence slot is free and
the pool can hold its worst case (prompt + max_tokens, capped at the context and at the pool)
beside the worst cases already admitted, so an admitted request always completes; the blocks
themselves are taken as positions are written. Otherwise it waits in the queue, and beyond the
queue `submit` raises QueueFull (the server's 503 with Retry-After). A request whose worst case
exceeds the whole pool runs when it fits and ends with finish_reason "length" when the pool has no
block left for it. Blocks come back on finish, cancel and disconnect. With `prefix_cache`, the
full blocks of every prompt (and of a finished sequence's whole text) are indexed by their tokens,
and a request starting with the same tokens (a system prompt, a chat's earlier turns) reuses them
and computes only the rest; the index gives blocks back, least recently used first, when the pool
runs short. `warm(ids)` computes and indexes a prompt that nobody has asked for yet: the history
a chat's next turn will start with, its reply as the template renders it (which may differ from
the tokens sampled: the server calls it when a reply ends, so that turn computes only its new
message).

Each step: retire cancelled sequences, admit waiting requests into free KV-cache slots, run
`Transformer.forward_batch` over the active sequences, sample each sequence's next token
(`generate.Sequence`: its own Sampler, its grammar's mask, stop strings, logprobs), and hand the
events to the request's sink. Requests with different LoRA adapters (`Params.adapter`) share
passes, each row with its own; the prefix index keeps each adapter's blocks apart. A constrained
sequence's next mask is computed on the mask thread
while the following forward pass runs. By default a step is a few passes chosen so
that results are bit for bit those of the sequence alone: the decode rows and the new prompts share
passes of at most `Transformer.invariant_rows` rows (the engine computes every row of such a pass as
it would alone), and a prompt longer than that gets a pass of its own, as `generate` prefills it;
`invariant=False` makes it one pass for everything. Per sequence the arithmetic is `generate.generate`'s (run.c's): prompt
forced, then sampled tokens until a stop token or `max_tokens`. No HTTP here. A request that
reuses another's prefix blocks may get logits that differ in the last bits from it run alone (its
prompt's remainder is a shorter pass); `prefix_cache=False` keeps them identical.
"""

import logging
import threading
import time
from collections import deque

from .. import kvcache, threads
from ..config import PASS_ROWS
from ..errors import Llama2Error
from ..generate import Params, Sequence, StopStrings, constraint_of  # noqa: F401 (Params, StopStrings: this module's API)

log = logging.getLogger("llama2.server")


class QueueFull(Exception):
    """No slot or KV blocks for the request now and the waiting queue is at its limit: try later."""


class PromptTooLong(ValueError):
    """The prompt needs more KV positions than the whole pool holds: it can never run."""


class ShuttingDown(Exception):
    """The scheduler has stopped admitting requests."""


class Cancelled(Exception):
    """Sent to a request's sink when the scheduler stops before the request finished."""


class Job:
    """A request inside the scheduler. `sink(item)` is called from the scheduler thread with each
    Event (the last one has a finish_reason) or with an exception if the request failed."""

    def __init__(self, params: Params, sink, constraint=None):
        self.params = params
        self.sink = sink
        self.constraint = constraint  # params.grammar's matcher, built before submit
        self.cancelled = False
        self.done = False
        self.scheduler = None
        self.blocks = 0  # the worst case it was admitted with (KV blocks), 0 while waiting
        self.reused = 0  # prompt positions taken from the prefix index, set when it gets a slot
        self.warm = False  # only computes its prompt for the index (Scheduler.warm): no answer

    def cancel(self):
        """Stop generating and free the slot before the next step (safe from any thread)."""
        if self.scheduler is not None:
            self.scheduler.cancel(self)


class _Sequence(Sequence):
    """generate.Sequence in a KV-cache slot, for a Job."""

    def __init__(self, job: Job, slot: int, tokenizer, speculator=None):
        super().__init__(job.params, tokenizer, constraint=job.constraint)
        self.job, self.slot = job, slot
        self.cached = []  # the tokens whose keys and values the slot holds, in order
        # speculative decoding: the sequence's speculative.Drafting, and this step's Draft (or None)
        self.drafting = speculator.start(job.params, slot) if speculator is not None else None
        self.draft = None

    def rows(self) -> list:
        """The tokens of this sequence's next pass: what to feed, then the draft's guesses."""
        return self.feed + self.draft.tokens if self.draft is not None else self.feed


class Scheduler:
    """Owns the model and a paged KV cache of `max_batch` sequence slots over a pool of
    `kv_budget` positions (default: every slot's whole context, committed only as used);
    `submit` from any thread, `start` once."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int, metrics=None,
                 invariant: bool = True, kv_budget: int = None, prefix_cache: bool = True, speculator=None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.invariant = invariant
        self.prefix_cache = prefix_cache
        self.speculator = speculator  # speculative.Speculator: its proposer has a slot per sequence slot
        # Rows of a pass whose logits are each bit for bit the sequence's alone (the engine's
        # figure, model.invariant_rows), and never more than config.PASS_ROWS (the activations
        # memory.py budgets for; a longer prompt runs alone, in passes of that many rows).
        self.pack_rows = max(1, min(int(getattr(model, "invariant_rows", 1)), model.config.seq_len, PASS_ROWS))
        seq_len = model.config.seq_len
        bt = kvcache.BLOCK_TOKENS
        budget = kv_budget if kv_budget is not None else max_batch * seq_len
        if budget < 1:
            raise ValueError("kv_budget must be at least 1 position")
        self.cache = model.new_cache(slots=max_batch, blocks=-(-budget // bt))
        if speculator is not None:  # rejected draft rows are taken back
            self.cache.rollback = speculator.most
        self.blocks = self.cache.pool.n_blocks
        self.budget = self.blocks * bt  # positions the pool holds
        self.threads = threads.threads()  # BLAS limits may be per thread: carry the caller's over
        self._cond = threading.Condition()
        self._waiting = deque()  # jobs that found no room yet
        self._admitted = deque()  # jobs with room, not yet given a slot by the scheduler thread
        self._committed = 0  # blocks of the worst cases admitted
        self._active = {}  # slot -> _Sequence
        self._free = list(range(max_batch - 1, -1, -1))
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="llama2-scheduler", daemon=True)

    # -- any thread ---------------------------------------------------------------------------

    def start(self):
        """Warm the kernels up, then start the loop."""
        self.model.warm_up()
        self._thread.start()

    def worst_case(self, params: Params) -> int:
        """KV blocks a request may hold at most: prompt + max_tokens positions, capped at the
        context and at the pool (such a request ends with "length" when the pool runs dry)."""
        positions = min(len(params.prompt) + params.max_tokens, self.model.config.seq_len)
        return min(-(-positions // kvcache.BLOCK_TOKENS), self.blocks)

    def submit(self, params: Params, sink, constraint=None) -> Job:
        """Queue a request; `constraint`: its grammar's matcher (generate.constraint_of), built
        here, on the caller's thread, when not given: the scheduler's loop never builds one."""
        if constraint is None and params.grammar is not None:
            constraint = constraint_of(params, self.tokenizer)
        job = Job(params, sink, constraint)
        job.scheduler = self
        if len(params.prompt) > self.budget:
            raise PromptTooLong(f"the prompt's {len(params.prompt)} tokens exceed the KV cache budget "
                                f"of {self.budget} positions")
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if not self._waiting and self._room(job):
                self._admit(job)
            elif len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._active) + len(self._admitted)} running, {len(self._waiting)} "
                                f"waiting (limit {self.max_queue}); KV cache: {self._committed} of "
                                f"{self.blocks} blocks of {kvcache.BLOCK_TOKENS} positions promised, "
                                f"max batch {self.max_batch}")
            else:
                self._waiting.append(job)
            self._cond.notify()
        return job

    def warm(self, prompt, adapter: int = -1) -> bool:
        """Compute the keys and values of `prompt` (token ids) into the prefix index for requests
        that will start with it, when a slot and the blocks are free now and nobody waits; nothing
        is sampled or answered. Requests submitted after it get their slot after its pass, so they
        find its blocks (with LoRA adapter `adapter`'s keys and values). False when it was not
        taken (no room, or no prefix cache)."""
        if not self.prefix_cache or not 0 < len(prompt) <= self.budget:
            return False
        params = Params(prompt=tuple(prompt), max_tokens=0, temperature=0.0, top_p=1.0, seed=1, adapter=adapter)
        job = Job(params, lambda item: None)
        job.scheduler, job.warm = self, True
        with self._cond:
            if not self._accepting or self._waiting or not self._room(job):
                return False
            self._admit(job)
            self._cond.notify()
        return True

    def _room(self, job: Job) -> bool:  # lock held
        return (len(self._active) + len(self._admitted) < self.max_batch
                and self._committed + self.worst_case(job.params) <= self.blocks)

    def _admit(self, job: Job):  # lock held
        job.blocks = self.worst_case(job.params)
        self._committed += job.blocks
        self._admitted.append(job)

    def _release(self, job: Job):  # lock held: its promise of blocks is over
        self._committed -= job.blocks
        job.blocks = 0
        while self._waiting and self._room(self._waiting[0]):  # in order: nobody overtakes
            self._admit(self._waiting.popleft())

    def cancel(self, job: Job):
        with self._cond:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            for line in (self._waiting, self._admitted):
                if job in line:
                    line.remove(job)
                    job.done = True
                    self._release(job)
                    self._count(job, "cancelled")
            self._cond.notify()

    def stop(self, timeout: float = None):
        """Stop admitting; cancel what is still waiting or running (its sink gets Cancelled); join."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> tuple:
        """(active sequences, waiting requests) right now."""
        with self._cond:
            return len(self._active), len(self._waiting) + len(self._admitted)

    def kv_usage(self) -> dict:
        """The pool's blocks: total, promised to admitted requests, free now (besides those only
        the prefix index holds, which it gives back when needed)."""
        with self._cond:
            return {"blocks": self.blocks, "total": self.blocks, "block_tokens": kvcache.BLOCK_TOKENS,
                    "committed": self._committed, "free": self.cache.pool.free_blocks}

    # -- the scheduler thread -----------------------------------------------------------------

    def _run(self):
        threads.set_threads(self.threads)
        while True:
            with self._cond:
                self._retire_cancelled()
                if self._stop:
                    self._fail_all(Cancelled("the server stopped before this request finished"))
                    return
                while self._admitted:
                    job = self._admitted.popleft()
                    self._place(job)
                    if job.warm:  # the jobs behind it may start with its prompt: place them after its pass
                        break
                if not self._active:
                    self._cond.wait()
                    continue
                batch = list(self._active.values())
                waiting = len(self._waiting)
            self._draft(batch)
            for group in self._passes(batch):
                self._pass([seq for seq in group if not seq.job.cancelled], waiting)

    def _place(self, job: Job):  # lock held: give an admitted job a slot (and its prefix)
        slot = self._free.pop()
        self.cache.reset(slot)
        seq = self._active[slot] = _Sequence(job, slot, self.tokenizer, self.speculator)
        if self.prefix_cache:
            reused = self.cache.reuse_prefix(slot, job.params.prompt, self._root(job.params))
            seq.feed, seq.cached = seq.feed[reused:], list(job.params.prompt[:reused])
            job.reused = reused
            if self.metrics is not None and not job.warm:
                self.metrics.cached(reused)

    def _root(self, params: Params):  # its prefix chains: KV under another adapter is other KV
        return self.cache.adapter_root(params.adapter)

    def _draft(self, batch):
        """Speculative decoding: the guesses of every decoding sequence whose length policy asks
        for some, proposed together (a draft model's steps batched over the slots)."""
        asks, seqs = [], []
        decoding = sum(seq.prefilled for seq in batch)
        for seq in batch:
            seq.draft = None
            if seq.drafting is None or not seq.prefilled or seq.job.cancelled:
                continue
            # at most the positions its admission promised (prompt + max_tokens) and the context
            room = min(self.cache.seq_len - int(self.cache.pos[seq.slot]) - 1,
                       seq.params.max_tokens - seq.generated - 1)
            ask = seq.drafting.ask(room, base=decoding)
            if ask is not None:
                asks.append(ask)
                seqs.append(seq)
        if not asks:
            return
        try:
            behind = max(self.speculator.proposer.behind(a.plain_run) for a in asks)  # batched: the longest
            t0 = time.perf_counter()
            drafts = self.speculator.proposer.propose(asks)
            self.speculator.costs.record_draft(max(a.k for a in asks), time.perf_counter() - t0, behind)
        except Exception:  # a bug: decode these plainly
            log.exception("drafting failed")
            return
        for seq, draft in zip(seqs, drafts):
            seq.draft = draft if draft.tokens else None

    def _passes(self, batch) -> list:
        """How this step's sequences share forward passes. One pass for all of them, or, when
        `invariant`, passes whose every row gets the bits it gets alone: the decoding sequences
        (a row each) and the new prompts (their remaining tokens) packed in order, first fit, into
        passes of at most the model's `invariant_rows` rows, and a prompt longer than that in a
        pass of its own (as `generate` prefills it)."""
        if not self.invariant:
            return [batch]
        limit = self.pack_rows
        alone, bins = [], []  # bins: [rows, [seq, ...]]
        for seq in sorted(batch, key=lambda seq: not seq.prefilled):  # decodes first, stable
            rows = len(seq.rows())
            if rows > limit:
                alone.append([seq])
                continue
            for b in bins:
                if b[0] + rows <= limit:
                    b[0] += rows
                    b[1].append(seq)
                    break
            else:
                bins.append([rows, [seq]])
        return [group for _, group in bins] + alone

    def _pass(self, group, waiting: int):
        """One forward pass for `group`; sample each sequence and hand out its events."""
        group = [seq for seq in group if self._grow(seq)]
        if not group:
            return
        segments = [(seq.slot, seq.rows()) for seq in group]
        adapters = [seq.params.adapter for seq in group]  # each row its own LoRA adapter, one pass
        prefilled = sum(len(seq.feed) for seq in group if not seq.prefilled)
        drafted = any(seq.draft is not None for seq in group)
        starts = [int(self.cache.pos[seq.slot]) for seq in group]
        t0 = time.perf_counter()
        try:
            # [len(group), vocab]; with drafts every row's, and each sequence gets its own rows
            logits = self.model.forward_batch(segments, self.cache, drafted, adapters)
        except Exception as e:  # a bug, not a user error: fail these requests, keep serving
            log.exception("forward pass failed for %d sequences", len(group))
            with self._cond:
                for seq in group:
                    self._finish(seq, e)
            return
        generated = 0
        if self.speculator is not None and all(seq.prefilled for seq in group):  # decode passes: what drafts weigh
            self.speculator.costs.record_pass(sum(len(t) for _, t in segments), time.perf_counter() - t0)
        if drafted:
            ends = [0]
            for _, tokens in segments:
                ends.append(ends[-1] + len(tokens))
            logits = [logits[e - 1] if seq.draft is None else logits[b:e]
                      for seq, b, e in zip(group, ends, ends[1:])]
        fed = [list(seq.feed) for seq in group]
        for seq, tokens in zip(group, fed):
            if seq.draft is None:
                seq.cached.extend(tokens)
            if not seq.prefilled and self.prefix_cache:  # a prompt's blocks are there for the next requests
                self.cache.publish(seq.slot, seq.cached, self._root(seq.params))
        for seq, row, start, tokens in zip(group, logits, starts, fed):
            if seq.job.cancelled:
                continue
            if seq.job.warm:  # its prompt is in the index: done
                with self._cond:
                    self._finish(seq)
                continue
            try:
                if seq.draft is not None:  # keep the guesses the target accepts, drop the other rows
                    events, kept = seq.drafting.settle(seq, row, seq.draft)
                    self.cache.truncate(seq.slot, start + 1 + kept)
                    seq.cached.extend(tokens + seq.draft.tokens[:kept])
                elif seq.drafting is not None:
                    events = seq.drafting.plain(seq, row)
                else:
                    events = seq.advance(row)
            except Llama2Error as e:  # the request's grammar gave out mid-answer (a llguidance limit)
                log.warning("request ended: %s", e)
                with self._cond:
                    self._finish(seq, e)
                continue
            except Exception as e:
                log.exception("sampling failed")
                with self._cond:
                    self._finish(seq, e)
                continue
            generated += sum(ev.token is not None for ev in events)
            if events[-1].finish_reason is not None:
                with self._cond:  # done before the last event is out: a late cancel is a no-op
                    self._finish(seq)
            for ev in events:
                self._deliver(seq.job, ev)
        if self.metrics is not None:
            self.metrics.step(len(group), prefilled, generated, waiting)

    def _grow(self, seq: _Sequence) -> bool:
        """Take the blocks seq's next pass writes; when the pool has none left (only a request
        admitted beyond the pool's size), end it with "length"."""
        try:
            self.cache.reserve(seq.slot, len(seq.rows()))
            return True
        except kvcache.CacheFull as e:
            log.warning("request ended early, KV cache full: %s after %d positions", e, self.cache.pos[seq.slot])
            event = seq.finish("length")
            with self._cond:
                self._finish(seq)
            self._deliver(seq.job, event)
            return False

    def _deliver(self, job: Job, item):
        try:
            job.sink(item)
        except Exception:  # the listener is gone (its event loop closed): drop the request
            job.cancelled = True

    def _finish(self, seq: _Sequence, error: Exception = None):
        """Free the slot (lock held); tell the sink about an error."""
        if self._active.get(seq.slot) is seq:
            del self._active[seq.slot]
            if error is None and not seq.job.cancelled and self.prefix_cache:
                self.cache.publish(seq.slot, seq.cached, self._root(seq.params))  # a chat's next turn starts with all this
            self.cache.reset(seq.slot)
            if self.speculator is not None:
                self.speculator.proposer.release(seq.slot)
            self._free.append(seq.slot)
            self._release(seq.job)
        seq.close()
        if not seq.job.done:
            seq.job.done = True
            if error is not None:
                self._deliver(seq.job, error)
            cancelled = seq.job.cancelled or isinstance(error, Cancelled)
            self._count(seq.job, "cancelled" if cancelled else "error" if error else "ok")

    def _retire_cancelled(self):
        for seq in [s for s in self._active.values() if s.job.cancelled]:
            self._finish(seq)

    def _fail_all(self, error: Exception):
        for seq in list(self._active.values()):
            self._finish(seq, error)
        while self._waiting or self._admitted:
            job = (self._waiting or self._admitted).popleft()
            job.done = True
            self._deliver(job, error)
            self._count(job, "cancelled")

    def _count(self, job: Job, outcome: str):
        if self.metrics is not None and not job.warm:  # requests, not the scheduler's own work
            self.metrics.finished(outcome)
