"""Continuous batching: one thread owns the model and runs the active sequences together.

Each step: retire cancelled sequences, admit waiting requests into free KV-cache slots, run
`Transformer.forward_batch` over the active sequences, sample each sequence's next token
(`generate.Sequence`: its own Sampler, its grammar's mask, stop strings, logprobs), and hand the
events to the request's sink. A constrained sequence's next mask is computed on the mask thread
while the following forward pass runs. By default a step is a few passes chosen so
that results are bit for bit those of the sequence alone (each new prompt prefilled in a pass of its
own, as `generate` does; decodes in groups the engine computes row by row); `invariant=False` makes
it one pass for everything. Per sequence the arithmetic is `generate.generate`'s (run.c's): prompt
forced, then sampled tokens until a stop token or `max_tokens`. No HTTP here.
"""

import logging
import threading
from collections import deque

from .. import threads
from ..generate import Params, Sequence, StopStrings  # noqa: F401 (Params, StopStrings: this module's API)
from ..model import SMALL_BATCH

log = logging.getLogger("llama2.server")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit: try again later."""


class ShuttingDown(Exception):
    """The scheduler has stopped admitting requests."""


class Cancelled(Exception):
    """Sent to a request's sink when the scheduler stops before the request finished."""


class Job:
    """A request inside the scheduler. `sink(item)` is called from the scheduler thread with each
    Event (the last one has a finish_reason) or with an exception if the request failed."""

    def __init__(self, params: Params, sink):
        self.params = params
        self.sink = sink
        self.cancelled = False
        self.done = False
        self.scheduler = None

    def cancel(self):
        """Stop generating and free the slot before the next step (safe from any thread)."""
        if self.scheduler is not None:
            self.scheduler.cancel(self)


class _Sequence(Sequence):
    """generate.Sequence in a KV-cache slot, for a Job."""

    def __init__(self, job: Job, slot: int, tokenizer):
        super().__init__(job.params, tokenizer)
        self.job, self.slot = job, slot


class Scheduler:
    """Owns the model and a KV cache of `max_batch` slots; `submit` from any thread, `start` once."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int, metrics=None,
                 invariant: bool = True):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.invariant = invariant
        self.decode_group = SMALL_BATCH  # rows the engine's decode kernels take in one call
        self.cache = model.new_cache(slots=max_batch)
        self.threads = threads.threads()  # numba's thread count is per thread: carry the caller's over
        self._cond = threading.Condition()
        self._waiting = deque()
        self._active = {}  # slot -> _Sequence
        self._free = list(range(max_batch - 1, -1, -1))
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="llama2-scheduler", daemon=True)

    # -- any thread ---------------------------------------------------------------------------

    def start(self):
        """Load (or compile) the compiled kernels, then start the loop."""
        self.model.warm_up()
        self._thread.start()

    def submit(self, params: Params, sink) -> Job:
        job = Job(params, sink)
        job.scheduler = self
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            held = len(self._waiting) + len(self._active)
            if held >= self.max_batch + self.max_queue:
                raise QueueFull(f"{held} requests are running or waiting, the limit "
                                f"({self.max_batch} running + {self.max_queue} waiting)")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job):
        with self._cond:
            if job.done or job.cancelled:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
                self._count("cancelled")
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
            return len(self._active), len(self._waiting)

    # -- the scheduler thread -----------------------------------------------------------------

    def _run(self):
        threads.set_threads(self.threads)
        while True:
            with self._cond:
                self._retire_cancelled()
                if self._stop:
                    self._fail_all(Cancelled("the server stopped before this request finished"))
                    return
                while self._free and self._waiting:
                    job = self._waiting.popleft()
                    slot = self._free.pop()
                    self.cache.reset(slot)
                    self._active[slot] = _Sequence(job, slot, self.tokenizer)
                if not self._active:
                    self._cond.wait()
                    continue
                batch = list(self._active.values())
                waiting = len(self._waiting)
            for group in self._passes(batch):
                self._pass([seq for seq in group if not seq.job.cancelled], waiting)

    def _passes(self, batch) -> list:
        """How this step's sequences share forward passes. One pass for all of them, or, when
        `invariant`: each new prompt in a pass of its own (as `generate` prefills it) and the decoding
        sequences in passes of at most `decode_group` rows, which the engine computes row by row
        in a fixed order, so every logit is bit for bit what the sequence alone would get."""
        if not self.invariant:
            return [batch]
        fresh = [[seq] for seq in batch if not seq.prefilled]
        decoding = [seq for seq in batch if seq.prefilled]
        g = self.decode_group
        return fresh + [decoding[i:i + g] for i in range(0, len(decoding), g)]

    def _pass(self, group, waiting: int):
        """One forward pass for `group`; sample each sequence and hand out its events."""
        if not group:
            return
        segments = [(seq.slot, seq.feed) for seq in group]
        prefilled = sum(len(seq.feed) for seq in group if not seq.prefilled)
        try:
            logits = self.model.forward_batch(segments, self.cache)  # [len(group), vocab]
        except Exception as e:  # a bug, not a user error: fail these requests, keep serving
            log.exception("forward pass failed for %d sequences", len(group))
            with self._cond:
                for seq in group:
                    self._finish(seq, e)
            return
        generated = 0
        for seq, row in zip(group, logits):
            if seq.job.cancelled:
                continue
            try:
                events = seq.advance(row)
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

    def _deliver(self, job: Job, item):
        try:
            job.sink(item)
        except Exception:  # the listener is gone (its event loop closed): drop the request
            job.cancelled = True

    def _finish(self, seq: _Sequence, error: Exception = None):
        """Free the slot (lock held); tell the sink about an error."""
        if self._active.get(seq.slot) is seq:
            del self._active[seq.slot]
            self._free.append(seq.slot)
        seq.close()
        if not seq.job.done:
            seq.job.done = True
            if error is not None:
                self._deliver(seq.job, error)
            cancelled = seq.job.cancelled or isinstance(error, Cancelled)
            self._count("cancelled" if cancelled else "error" if error else "ok")

    def _retire_cancelled(self):
        for seq in [s for s in self._active.values() if s.job.cancelled]:
            self._finish(seq)

    def _fail_all(self, error: Exception):
        for seq in list(self._active.values()):
            self._finish(seq, error)
        while self._waiting:
            job = self._waiting.popleft()
            job.done = True
            self._deliver(job, error)
            self._count("cancelled")

    def _count(self, outcome: str):
        if self.metrics is not None:
            self.metrics.finished(outcome)
