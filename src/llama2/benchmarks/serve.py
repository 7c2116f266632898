"""`llama2 bench serve`: concurrent chats on `llama2 serve` (default flags), against llama-cpp-python's
server on the same GGUF in the same run when it is installed.

Workload (issue 11's): C concurrent chats (C in --streams) share one system prompt of
--system-tokens tokens and each sends its own user message to /v1/chat/completions (streaming,
greedy, --max-tokens), --repeats rounds per C with fresh user messages. Reported per server and C:
aggregate decode tok/s (tokens after each chat's first, over the time from the first chat's first
token to the last chat's end), aggregate tok/s (all tokens over the round's wall time, prefill
included), per-chat decode tok/s (median), time to first token p50/p95 (request sent -> first text
chunk) and the server's peak RSS so far (VmHWM of its process after the level). Then the second
turn: one chat's first turn, then its second turn (the history plus a new message): time to first
token of that turn, against the time to recompute the whole history (ours: the same request on a
fresh `llama2 serve --no-prefix-cache`; llama-cpp-python: the same request after an unrelated one
has replaced its context).

The model is MODEL, or a benchmark shape's file made (once, resumably) by the engine benchmark's
file maker: `--shape llama2-7b --weights q4_k_m`. Both servers are subprocesses on loopback with the
same threads; ours gets --max-batch as large as the most streams measured (its other flags are the
defaults: KV type, KV budget from free memory, prefix reuse, prompt packing), llama-cpp-python's
its documented settings for the same context (n_ctx = the model's context; it serves one request
at a time, so one context serves all its chats). Run it on an otherwise idle machine.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import Llama2Error, UsageError

STREAMS = "1,4,8,16"
SYSTEM_TOKENS = 64
START_TIMEOUT_S = 600
OURS, PEER = "llama2 serve", "llama-cpp-python"
SYSTEM_TEXT = ("You are a helpful, patient assistant for a small library. Answer questions about books, "
               "opening hours, borrowing rules and events clearly and briefly. When you are not sure, "
               "say so and suggest asking the staff at the front desk. Keep a friendly tone, avoid "
               "jargon, never invent titles or authors, and mention the library's online catalogue when "
               "a reader looks for a particular book, a series, an author's other works or new arrivals "
               "of the month in any section of the building.")
TOPICS = ["a book about whales", "the opening hours on Sunday", "how to renew a loan", "a story for a "
          "five-year-old", "the reading club", "late fees", "a quiet room to study", "books about space",
          "a cookbook for beginners", "poetry for a wedding", "printing a document", "a map of the city",
          "mystery novels", "a history of trains", "learning French", "a gift card"]


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="the model file (GGUF, or .bin with --gguf for the peer); or use --shape")
    p.add_argument("-z", "--tokenizer", help="tokenizer.bin for a .bin MODEL")
    p.add_argument("--shape", help="a benchmark shape instead of MODEL: llama2-7b, tinyllama-1.1b or tiny "
                                   "(its file is made once in --dir, as `llama2 bench --prepare` does)")
    p.add_argument("--weights", default="q4_k_m", help="the shape's file: q8_0, q4_0, q4_k_m, q6_k or f16 "
                                                       "(default q4_k_m)")
    p.add_argument("--dir", metavar="DIR", help="where the benchmark models are kept "
                                                "(default $LLAMA2_HOME/bench, else ~/.cache/llama2/bench)")
    p.add_argument("--gguf", help="the same weights as GGUF, for llama-cpp-python's server "
                                  "(default: MODEL itself if it is a GGUF, else MODEL with the suffix .gguf)")
    p.add_argument("--streams", default=STREAMS, help=f"concurrent chats to measure (default {STREAMS})")
    p.add_argument("--system-tokens", type=int, default=SYSTEM_TOKENS,
                   help=f"tokens of the shared system prompt (default {SYSTEM_TOKENS})")
    p.add_argument("--max-tokens", type=int, default=128, help="completion tokens per turn (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per stream count (default 3)")
    p.add_argument("--threads", type=int, help="compute threads for both servers (default: the cores available)")
    p.add_argument("--no-peer", action="store_true", help="measure only llama2 serve")
    p.add_argument("--no-second-turn", action="store_true", help="skip the second-turn measurement")
    p.add_argument("--json", metavar="FILE", help="also write the machine, settings, results and ratios "
                                                  "as JSON to FILE")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 1 and 2 chats, 8 tokens, 1 round, 16-token system prompt")


@dataclass
class Result:
    server: str
    streams: int
    requests: int
    tokens: int
    aggregate_decode_tok_s: float
    aggregate_tok_s: float
    stream_decode_tok_s: float  # median over the requests
    ttft_p50_ms: float
    ttft_p95_ms: float
    peak_rss_mb: float  # the server process's VmHWM after this level (None: unknown)


@dataclass
class SecondTurn:
    server: str
    history_tokens: int  # the second turn's prompt, as our tokenizer counts it
    turn2_ttft_ms: float  # with the first turn's blocks (ours: prefix reuse)
    recompute_ttft_ms: float  # the same request with nothing cached
    ratio: float  # turn2 / recompute (the target: at most 0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def peak_rss_mb(pid: int):
    """VmHWM (peak resident set) of process `pid` in MB, or None when /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


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

    def peak_rss_mb(self):
        return peak_rss_mb(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the workload -----------------------------------------------------------------------------------

def system_prompt(tokenizer, n: int) -> str:
    """The longest run of SYSTEM_TEXT's words (repeated as needed) that encodes to at most `n` tokens."""
    words = SYSTEM_TEXT.split()
    while len(tokenizer.encode(" ".join(words), bos=False)) < n:
        words = words + SYSTEM_TEXT.split()
    lo, hi = 1, len(words)
    while lo < hi:  # the most words within n tokens
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]), bos=False)) <= n:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def user_message(chat: int, round_: int) -> str:
    return f"Round {round_}, reader {chat}: can you help me with {TOPICS[chat % len(TOPICS)]}?"


def _chat(httpx, base, body, out, barrier=None):
    """One streaming chat completion: (sent, first text, end, text chunks, text) into `out`."""
    with httpx.Client(timeout=3600) as client:
        if barrier is not None:
            barrier.wait()
        sent = time.perf_counter()
        first, chunks, text = None, 0, []
        with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                out.append(RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}"))
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if piece:
                    chunks += 1
                    text.append(piece)
                    if first is None:
                        first = time.perf_counter()
        end = time.perf_counter()
        out.append((sent, first or end, end, chunks, "".join(text)))


def _body(model, messages, args):
    return {"model": model, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True}


def _one(httpx, name, base, body) -> tuple:
    out = []
    _chat(httpx, base, body, out)
    if isinstance(out[0], Exception):
        raise Llama2Error(f"{name}: {out[0]}")
    return out[0]


def measure(httpx, name, proc, model, streams, args, system, round0=0) -> Result:
    ttft, rates, tokens, decoded, walls, windows = [], [], 0, 0, 0.0, 0.0
    for r in range(args.repeats):
        out, barrier = [], threading.Barrier(streams)
        bodies = [_body(model, [{"role": "system", "content": system},
                                {"role": "user", "content": user_message(i, round0 + r)}], args)
                  for i in range(streams)]
        threads = [threading.Thread(target=_chat, args=(httpx, proc.base, b, out, barrier)) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [o for o in out if isinstance(o, Exception)]
        if errors:
            raise Llama2Error(f"{name}: {errors[0]}")
        walls += max(o[2] for o in out) - min(o[0] for o in out)
        windows += max(o[2] for o in out) - min(o[1] for o in out)
        for sent, first, end, n, _ in out:
            ttft.append(first - sent)
            tokens += n
            decoded += max(0, n - 1)
            if n > 1 and end > first:
                rates.append((n - 1) / (end - first))
    return Result(name, streams, len(ttft), tokens, decoded / windows if windows else 0.0,
                  tokens / walls if walls else 0.0, statistics.median(rates) if rates else 0.0,
                  1000 * _percentile(ttft, 0.5), 1000 * _percentile(ttft, 0.95), proc.peak_rss_mb())


def second_turn_messages(httpx, name, base, model, args, system) -> list:
    """A chat's first turn, then the messages of its second (history plus a new user message)."""
    first = [{"role": "system", "content": system}, {"role": "user", "content": user_message(0, 1000)}]
    reply = _one(httpx, name, base, _body(model, first, args))[4]
    return first + [{"role": "assistant", "content": reply},
                    {"role": "user", "content": "Thank you. And could you say that again more briefly?"}]


def _ttft(httpx, name, base, model, messages, args) -> float:
    sent, first, *_ = _one(httpx, name, base, _body(model, messages, args))
    return 1000 * (first - sent)


def _history_tokens(tokenizer, messages) -> int:
    from ..chat import encode_dialog
    try:
        return len(encode_dialog(tokenizer, [(m["role"], m["content"]) for m in messages]))
    except Exception:  # noqa: BLE001 -- a figure for the report only
        return None


# -- the servers ------------------------------------------------------------------------------------

def _ours(args, max_streams, port, *extra):
    src = str(Path(__file__).resolve().parents[2])  # run this checkout's code, as the CLI does
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "llama2", "serve", args.model, "--port", str(port),
            "--max-batch", str(max_streams), "--threads", str(args.threads), *extra]
    if args.tokenizer:
        argv += ["-z", args.tokenizer]
    return _Process(OURS, argv, port, env)


def _peer(args, gguf, port, n_ctx):
    """llama-cpp-python's server as its users run it, with the settings a fair race needs: the
    model's context, llama-2 chat formatting (as ours), no interrupting a stream when another
    request arrives (its default), our threads."""
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(n_ctx), "--chat_format", "llama-2",
            "--interrupt_requests", "false", "--verbose", "false",
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    return _Process(PEER, argv, port)


def _peer_missing() -> str:
    import importlib.util
    for module in ("llama_cpp", "llama_cpp.server", "sse_starlette", "starlette_context",
                   "pydantic_settings", "fastapi"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        except ImportError as e:
            return f"{module} cannot be imported ({e})"
    return ""


def _resolve_model(args, io):
    """args.model from --shape/--weights (the file made once in the bench folder) or as given."""
    if args.shape is None:
        if args.model is None:
            raise UsageError("bench serve: give MODEL or --shape")
        if not Path(args.model).exists():
            raise Llama2Error(f"{args.model}: no such model file")
        return
    from . import engine, files as bench_files
    if args.model is not None:
        raise UsageError("bench serve: give MODEL or --shape, not both")
    if args.shape not in engine.FILE_SHAPES:
        raise UsageError(f"--shape {args.shape}: expected one of {', '.join(engine.FILE_SHAPES)}")
    if args.weights not in bench_files.FILES or args.weights == "bf16":
        raise UsageError(f"--weights {args.weights}: expected one of "
                         f"{', '.join(k for k in bench_files.FILES if k != 'bf16')}")
    directory = Path(args.dir) if args.dir else engine.bench_dir()
    assets = Path(os.environ.get("LLAMA2_ASSETS", "../shared/assets"))
    _, where, _ = engine.prepare_files(args.shape, [args.weights], False, directory,
                                       assets if assets.exists() else None, args.threads, None,
                                       lambda text: io.err(f"bench serve: {text}\n"))
    if args.weights not in where or not Path(where[args.weights]).exists():
        raise Llama2Error(f"bench serve: {args.shape} {args.weights} could not be made (see above)")
    args.model = str(where[args.weights])


def _tokenizer(args):
    from ..llama import find_tokenizer
    from ..formats import load_checkpoint
    from ..tokenizer import Tokenizer
    ckpt = load_checkpoint(args.model)
    tok = getattr(ckpt, "tokenizer", None)
    if tok is None:
        tok = Tokenizer.load(find_tokenizer(args.model, args.tokenizer), vocab_size=ckpt.config.vocab_size)
    return ckpt.config, tok


def run(args, io) -> int:
    try:
        import httpx
    except ImportError:
        raise Llama2Error("bench serve needs httpx: pip install httpx") from None
    if args.quick:
        args.streams, args.max_tokens, args.repeats, args.system_tokens = "1,2", 8, 1, 16
    try:
        levels = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"--streams {args.streams!r}: expected numbers separated by commas") from None
    if not levels or levels[0] < 1 or args.max_tokens < 1 or args.repeats < 1 or args.system_tokens < 1:
        raise UsageError("--streams, --system-tokens, --max-tokens and --repeats must be positive")
    if args.threads is None:  # the same for both servers (llama-cpp-python would take half the cores)
        from ..threads import available_cores
        args.threads = available_cores()
    _resolve_model(args, io)
    config, tokenizer = _tokenizer(args)
    system = system_prompt(tokenizer, args.system_tokens)
    system_tokens = len(tokenizer.encode(system, bos=False))
    servers = [(OURS, lambda port, *extra: _ours(args, levels[-1], port, *extra))]
    gguf = args.gguf or (args.model if args.model.endswith(".gguf") else str(Path(args.model).with_suffix(".gguf")))
    if args.no_peer:
        pass
    elif (why := _peer_missing()) or not Path(gguf).is_file():
        why = why or f"{gguf}: no such GGUF file (--gguf)"
        io.err(f"bench serve: skipping llama-cpp-python's server: {why}\n")
    else:
        servers.append((PEER, lambda port: _peer(args, gguf, port, config.seq_len)))

    results, turns = [], []
    for name, start in servers:
        proc = start(_free_port())
        try:
            model = proc.wait_ready(httpx)
            warm = [{"role": "user", "content": "Hello"}]
            _one(httpx, name, proc.base, _body(model, warm, args))  # warm-up
            for streams in levels:
                results.append(measure(httpx, name, proc, model, streams, args, system, round0=100 * streams))
                io.err(f"bench serve: {name}: {streams} chats done\n")
            if not args.no_second_turn:
                messages = second_turn_messages(httpx, name, proc.base, model, args, system)
                turn2 = _ttft(httpx, name, proc.base, model, messages, args)
                if name == PEER:  # an unrelated request takes its one context: the history is recomputed
                    _one(httpx, name, proc.base, _body(model, warm, args))
                    recompute = _ttft(httpx, name, proc.base, model, messages, args)
        finally:
            proc.stop()
        if not args.no_second_turn and name == OURS:  # the same request on a server that reuses nothing
            fresh = start(_free_port(), "--no-prefix-cache")
            try:
                model = fresh.wait_ready(httpx)
                _one(httpx, name, fresh.base, _body(model, warm, args))
                recompute = _ttft(httpx, name, fresh.base, model, messages, args)
            finally:
                fresh.stop()
        if not args.no_second_turn:
            turns.append(SecondTurn(name, _history_tokens(tokenizer, messages), turn2, recompute,
                                    turn2 / recompute if recompute else 0.0))
    from .engine import machine
    settings = {"model": args.model, "gguf": gguf if any(n == PEER for n, _ in servers) else None,
                "context": config.seq_len, "system_tokens": system_tokens, "max_tokens": args.max_tokens,
                "repeats": args.repeats, "threads": args.threads, "streams": levels,
                "ours_flags": f"--max-batch {levels[-1]} --threads {args.threads} (the rest default)",
                "peer_flags": f"--n_ctx {config.seq_len} --chat_format llama-2 --interrupt_requests false "
                              f"--n_threads {args.threads} --n_threads_batch {args.threads}"}
    report = {"machine": machine(), "settings": settings, "results": [asdict(r) for r in results],
              "second_turn": [asdict(t) for t in turns], "ratios": ratios(results)}
    io.out(table(report).encode())
    if args.json:
        _write_json(args.json, report)
    return 0


def ratios(results) -> list:
    """[(what, value)]: ours at C streams over ours at 1, and ours over the peer at each C."""
    by = {(r.server, r.streams): r for r in results}
    out = []
    one = by.get((OURS, 1))
    for (server, streams), r in sorted(by.items()):
        if server != OURS:
            continue
        if streams > 1 and one and one.aggregate_decode_tok_s:
            out.append([f"{OURS} at {streams} chats / at 1 (aggregate decode tok/s)",
                        r.aggregate_decode_tok_s / one.aggregate_decode_tok_s])
        peer = by.get((PEER, streams))
        if peer and peer.aggregate_decode_tok_s:
            out.append([f"{OURS} / {PEER} at {streams} chats (aggregate decode tok/s)",
                        r.aggregate_decode_tok_s / peer.aggregate_decode_tok_s])
    return out


def _write_json(path, report):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def table(report) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"machine: {m['cpu']} ({m['cpu_level']}), {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}",
             f"bench serve: {s['model']}, context {s['context']}, system prompt {s['system_tokens']} tokens "
             f"shared, {s['max_tokens']} tokens greedy per chat, {s['repeats']} rounds, {s['threads']} threads "
             "per server",
             f"  ours: {s['ours_flags']}; llama-cpp-python: {s['peer_flags']}",
             f"{'server':<18} {'chats':>5} {'agg decode tok/s':>16} {'agg tok/s':>9} {'chat tok/s':>10} "
             f"{'TTFT p50 ms':>11} {'TTFT p95 ms':>11} {'peak RSS MB':>11}"]
    for r in report["results"]:
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "?"
        lines.append(f"{r['server']:<18} {r['streams']:>5} {r['aggregate_decode_tok_s']:>16.1f} "
                     f"{r['aggregate_tok_s']:>9.1f} {r['stream_decode_tok_s']:>10.1f} {r['ttft_p50_ms']:>11.1f} "
                     f"{r['ttft_p95_ms']:>11.1f} {rss:>11}")
    for what, value in report["ratios"]:
        lines.append(f"{what}: {value:.2f}x")
    for t in report["second_turn"]:
        lines.append(f"{t['server']}: second turn ({t['history_tokens']} tokens of history) first token in "
                     f"{t['turn2_ttft_ms']:.0f} ms, recomputing the history {t['recompute_ttft_ms']:.0f} ms: "
                     f"{t['ratio']:.2f} of it")
    return "\n".join(lines) + "\n"
