"""`llama2 bench serve`: throughput and latency of `llama2 serve` under concurrent streams, against
llama-cpp-python's server on the same weights (GGUF) in the same run when it is installed.

For each server and each number of concurrent streams C, C clients send the same greedy streaming
completion at once (`--repeats` rounds). Reported: aggregate tok/s (completion tokens of all streams
over the round's wall time, prefill included), per-stream decode tok/s (tokens after the first over
the time after the first), and time to first token p50/p95 (request sent -> first text chunk).
Both servers are subprocesses on loopback; run it on an otherwise idle machine.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import Llama2Error, UsageError

STREAMS = "1,4,8,16"
START_TIMEOUT_S = 300
PROMPT = "Once upon a time"


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="our model file (.bin)")
    p.add_argument("-z", "--tokenizer", help="tokenizer.bin for MODEL")
    p.add_argument("--gguf", help="the same weights as GGUF, for llama-cpp-python's server "
                                  "(default: MODEL with the suffix .gguf, when it exists)")
    p.add_argument("--streams", default=STREAMS, help=f"concurrent streams to measure (default {STREAMS})")
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per stream count (default 3)")
    p.add_argument("--prompt", default=PROMPT, help=f"the prompt (default {PROMPT!r})")
    p.add_argument("--threads", type=int, help="compute threads for both servers (default: the cores available)")
    p.add_argument("--no-peer", action="store_true", help="measure only llama2 serve")
    p.add_argument("--json", action="store_true", help="print one JSON object per result instead of a table")
    p.add_argument("--quick", action="store_true", help="a smoke test: 1 and 2 streams, 8 tokens, 1 round")


@dataclass
class Result:
    server: str
    streams: int
    requests: int
    tokens: int
    aggregate_tok_s: float
    stream_decode_tok_s: float  # median over the requests
    ttft_p50_ms: float
    ttft_p95_ms: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class _Process:
    """A server subprocess; ready when GET /v1/models answers."""

    def __init__(self, name, argv, port, env=None):
        self.name, self.base = name, f"http://127.0.0.1:{port}"
        self.log = []
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def wait_ready(self, httpx):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Llama2Error(f"{self.name} exited with {self.proc.returncode}: {''.join(self.log)[-2000:]}")
            try:
                r = httpx.get(self.base + "/v1/models", timeout=5)
                if r.status_code == 200:
                    return r.json()["data"][0]["id"]
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise Llama2Error(f"{self.name} did not start within {START_TIMEOUT_S} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _one_stream(httpx, base, body, out, barrier):
    """One streaming request: (sent, first text, end, text chunks) into `out`."""
    with httpx.Client(timeout=600) as client:
        barrier.wait()
        sent = time.perf_counter()
        first, chunks = None, 0
        with client.stream("POST", base + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.append(RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}"))
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
        out.append((sent, first or time.perf_counter(), time.perf_counter(), chunks))


def measure(httpx, name, base, model, streams, args) -> Result:
    body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True}
    ttft, rates, tokens, walls = [], [], 0, 0.0
    for _ in range(args.repeats):
        out, barrier = [], threading.Barrier(streams)
        threads = [threading.Thread(target=_one_stream, args=(httpx, base, body, out, barrier))
                   for _ in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [o for o in out if isinstance(o, Exception)]
        if errors:
            raise Llama2Error(f"{name}: {errors[0]}")
        walls += max(o[2] for o in out) - min(o[0] for o in out)
        for sent, first, end, n in out:
            ttft.append(first - sent)
            tokens += n
            if n > 1 and end > first:
                rates.append((n - 1) / (end - first))
    return Result(name, streams, len(ttft), tokens, tokens / walls if walls else 0.0,
                  statistics.median(rates) if rates else 0.0,
                  1000 * _percentile(ttft, 0.5), 1000 * _percentile(ttft, 0.95))


def _ours(args, max_streams, port):
    src = str(Path(__file__).resolve().parents[2])  # run this checkout's code, as the CLI does
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "llama2", "serve", args.model, "--port", str(port),
            "--max-batch", str(max_streams), "--max-queue", str(max_streams), "--threads", str(args.threads)]
    if args.tokenizer:
        argv += ["-z", args.tokenizer]
    return _Process("llama2 serve", argv, port, env)


def _peer(args, gguf, port, n_ctx):
    """llama-cpp-python's server as its users run it, with two settings for a fair race: it must
    not interrupt a stream when another request arrives (its default), and it gets our context."""
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(n_ctx), "--interrupt_requests", "false",
            "--verbose", "false", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    return _Process("llama-cpp-python", argv, port)


def _peer_missing() -> str:
    import importlib.util
    for module in ("llama_cpp", "llama_cpp.server", "sse_starlette", "pydantic_settings", "fastapi"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except ImportError as e:
            return f"{module} cannot be imported ({e})"
    return ""


def run(args, io) -> int:
    try:
        import httpx
    except ImportError:
        raise Llama2Error("bench serve needs httpx: pip install httpx") from None
    if args.quick:
        args.streams, args.max_tokens, args.repeats = "1,2", 8, 1
    try:
        levels = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"--streams {args.streams!r}: expected numbers separated by commas") from None
    if not levels or levels[0] < 1 or args.max_tokens < 1 or args.repeats < 1:
        raise UsageError("--streams, --max-tokens and --repeats must be positive")
    if not Path(args.model).is_file():
        raise Llama2Error(f"{args.model}: no such model file")
    if args.threads is None:  # the same for both servers (llama-cpp-python would take half the cores)
        from ..threads import available_cores
        args.threads = available_cores()
    servers = [("llama2 serve", lambda port: _ours(args, levels[-1], port))]
    gguf = args.gguf or str(Path(args.model).with_suffix(".gguf"))
    if args.no_peer:
        pass
    elif (why := _peer_missing()) or not Path(gguf).is_file():
        why = why or f"{gguf}: no such GGUF file (--gguf)"
        io.err(f"bench serve: skipping llama-cpp-python's server: {why}\n")
    else:
        from ..formats import load_checkpoint
        n_ctx = load_checkpoint(args.model).config.seq_len
        servers.append(("llama-cpp-python", lambda port: _peer(args, gguf, port, n_ctx)))

    results = []
    for name, start in servers:
        proc = start(_free_port())
        try:
            model = proc.wait_ready(httpx)
            measure(httpx, name, proc.base, model, 1, argparse.Namespace(**{**vars(args), "repeats": 1}))  # warm-up
            for streams in levels:
                r = measure(httpx, name, proc.base, model, streams, args)
                results.append(r)
                if args.json:
                    io.out((json.dumps(asdict(r)) + "\n").encode())
                else:
                    io.err(f"  {name}: {streams} streams done\n")
        finally:
            proc.stop()
    if not args.json:
        io.out(table(results, args).encode())
    return 0


def table(results, args) -> str:
    lines = [f"bench serve: prompt {args.prompt!r}, {args.max_tokens} tokens greedy, "
             f"{args.repeats} rounds, {args.threads} threads per server",
             f"{'server':<18} {'streams':>7} {'agg tok/s':>10} {'stream tok/s':>12} "
             f"{'TTFT p50 ms':>11} {'TTFT p95 ms':>11}"]
    for r in results:
        lines.append(f"{r.server:<18} {r.streams:>7} {r.aggregate_tok_s:>10.1f} {r.stream_decode_tok_s:>12.1f} "
                     f"{r.ttft_p50_ms:>11.1f} {r.ttft_p95_ms:>11.1f}")
    by = {(r.server, r.streams): r for r in results}
    ours_1 = by.get(("llama2 serve", 1))
    for (server, streams), r in sorted(by.items()):
        if server == "llama2 serve" and streams > 1 and ours_1 and ours_1.aggregate_tok_s:
            lines.append(f"llama2 serve at {streams} streams: {r.aggregate_tok_s / ours_1.aggregate_tok_s:.2f}x "
                         "its single-stream aggregate")
        peer = by.get(("llama-cpp-python", streams))
        if server == "llama2 serve" and peer and peer.aggregate_tok_s:
            lines.append(f"llama2 serve / llama-cpp-python at {streams} streams: "
                         f"{r.aggregate_tok_s / peer.aggregate_tok_s:.2f}x aggregate tok/s")
    return "\n".join(lines) + "\n"
