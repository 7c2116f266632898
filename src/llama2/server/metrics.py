"""Server counters and gauges, rendered in the Prometheus text exposition format (version 0.0.4).

The scheduler thread reports each step; the HTTP layer reports requests it answered itself (errors,
rejections). One lock guards everything: updates are a few additions.
"""

import threading
import time
from collections import deque

RATE_WINDOW_S = 10.0  # tokens/s is averaged over the steps of the last this many seconds


class Metrics:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self.requests = {}  # (endpoint, outcome) -> count
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.batch_size = 0  # sequences in the last step
        self.queue_depth = 0  # requests waiting at the last step
        self._recent = deque()  # (time, generated tokens) of recent steps

    def request(self, endpoint: str, outcome: str):
        with self._lock:
            key = (endpoint, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1

    def finished(self, outcome: str):
        self.request("scheduler", outcome)

    def cached(self, tokens: int):
        """A request got its slot with `tokens` prompt tokens from the prefix index."""
        with self._lock:
            self.cached_tokens += tokens

    def step(self, batch: int, prefilled: int, generated: int, waiting: int):
        """One forward pass: `batch` sequences, `prefilled` of its tokens prompts, `generated`
        tokens sampled, `waiting` requests left in the queue."""
        now = self.clock()
        with self._lock:
            self.steps += 1
            self.batch_size, self.queue_depth = batch, waiting
            self.prompt_tokens += prefilled
            self.generated_tokens += generated
            self._recent.append((now, generated))
            self._trim(now)

    def _trim(self, now):
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = self.clock()
        with self._lock:
            self._trim(now)
            if not self._recent:
                return 0.0
            span = max(now - self._recent[0][0], 1e-3)
            return sum(n for _, n in self._recent) / span if len(self._recent) > 1 else 0.0

    def render(self, active: int, waiting: int, kv: dict = None) -> str:
        """Prometheus text; `active` and `waiting` are the scheduler's load at this moment, `kv` its
        KV pool (Scheduler.kv_usage)."""
        rate = self.tokens_per_second()
        with self._lock:
            lines = [
                "# HELP llama2_requests_total Requests answered, by endpoint and outcome.",
                "# TYPE llama2_requests_total counter",
            ]
            for (endpoint, outcome), n in sorted(self.requests.items()):
                lines.append(f'llama2_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
            lines += [
                "# HELP llama2_prompt_tokens_total Prompt tokens computed (the prefix cache's own "
                "passes for a chat's next turn included).",
                "# TYPE llama2_prompt_tokens_total counter",
                f"llama2_prompt_tokens_total {self.prompt_tokens}",
                "# HELP llama2_prompt_tokens_cached_total Prompt tokens of requests taken from the "
                "prefix index, not computed.",
                "# TYPE llama2_prompt_tokens_cached_total counter",
                f"llama2_prompt_tokens_cached_total {self.cached_tokens}",
                "# HELP llama2_generated_tokens_total Tokens sampled and sent.",
                "# TYPE llama2_generated_tokens_total counter",
                f"llama2_generated_tokens_total {self.generated_tokens}",
                "# HELP llama2_steps_total Forward passes run by the scheduler.",
                "# TYPE llama2_steps_total counter",
                f"llama2_steps_total {self.steps}",
                "# HELP llama2_queue_depth Requests waiting for a slot.",
                "# TYPE llama2_queue_depth gauge",
                f"llama2_queue_depth {waiting}",
                "# HELP llama2_batch_size Sequences running (one KV-cache slot each).",
                "# TYPE llama2_batch_size gauge",
                f"llama2_batch_size {active}",
                "# HELP llama2_last_step_batch_size Sequences in the last forward pass.",
                "# TYPE llama2_last_step_batch_size gauge",
                f"llama2_last_step_batch_size {self.batch_size}",
                "# HELP llama2_tokens_per_second Generated tokens per second over the last "
                f"{RATE_WINDOW_S:g} s.",
                "# TYPE llama2_tokens_per_second gauge",
                f"llama2_tokens_per_second {rate:.3f}",
            ]
            if kv is not None:
                lines += [
                    "# HELP llama2_kv_blocks KV cache blocks of the pool, by state (total; promised to "
                    "admitted requests; free now, besides those only the prefix index holds).",
                    "# TYPE llama2_kv_blocks gauge",
                    *(f'llama2_kv_blocks{{state="{k}"}} {kv[k]}' for k in ("total", "committed", "free")),
                ]
        return "\n".join(lines) + "\n"
