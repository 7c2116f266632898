"""The llama.cpp side of `llama2 bench`, run as a script (`python peer.py MODE ...`) in a child process.

It imports nothing of llama2 (only the standard library, numpy and llama_cpp), so the interpreter of
`--peer-python` (say a venv whose llama-cpp-python is built for AVX2 only) needs nothing else; our
own children (engine.py) import the shared parts from here. Modes, each printing one JSON line:

    measure IMPL MODEL THREADS SPAWNED DECODE_TOKENS [BATCH]   IMPL: llama_cpp | llama_cpp_no_extra_bufts;
                                                         BATCH 1: also multi-row decode (BATCH_SIZES)
    check IMPL MODEL THREADS OUT.npy                     teacher-forced logits to OUT, greedy ids,
                                                         CHECK_TEXT's ids
    quantize SOURCE OUT FTYPE THREADS                    llama.cpp's quantizer (LLAMA_FTYPE_MOSTLY_*)
    lookup IMPL MODEL THREADS JOB.json                   greedy completions with and without
                                                         LlamaPromptLookupDecoding (bench spec)
"""

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHORT_PROMPT = 8  # tokens of the prompt whose first token is the time to first token
DECODE_TOKENS = 256
CHECK_PROMPT = 16  # teacher-forced positions compared on the files of the large shapes
CHECK_GREEDY = 16  # greedy ids compared after them
BATCH_SIZES = (4, 8, 16)  # sequences decoding together in the multi-row decode rows
BATCH_STEPS = 32  # timed passes of one token per sequence, after each sequence's short prompt
# A prompt text both engines tokenize with the file's own vocabulary (BOS added, special tokens
# typed in it stay text): before timing, the two lists of ids must be equal.
CHECK_TEXT = "Once upon a time, a little robot named Max found 3 shiny stones by the river. It said: \"Hello!\""


def prompt_ids(n, vocab, seed=7):
    rng = np.random.default_rng(seed)
    return [1] + [int(t) for t in rng.integers(3, vocab, n - 1)]


def measure(vocab, spawned, start, step, prefill, decode_tokens=DECODE_TOKENS, batch=None):
    """The child's measurements, for any engine given as three functions: `start(prompt)` runs a
    prompt on a fresh context and returns the greedy token, `step(token)` feeds one token and returns
    the next greedy one, `prefill(prompt)` runs a prompt on a fresh context. With `batch`, also the
    multi-row decode rates {S: tok/s} (batch_rates)."""
    token = start(prompt_ids(SHORT_PROMPT, vocab))
    ttft = time.time() - spawned
    ids = [token]
    begin = time.perf_counter()
    token = step(token)  # the first decode step, timed apart
    ids.append(token)
    first_step = time.perf_counter() - begin
    begin = time.perf_counter()
    for _ in range(decode_tokens):
        token = step(token)
        ids.append(token)
    decode = decode_tokens / (time.perf_counter() - begin)
    rates = {}
    for n in (128, 512):
        prompt = prompt_ids(n, vocab, seed=n)
        for _ in range(2):  # the second run is timed
            begin = time.perf_counter()
            prefill(prompt)
            took = time.perf_counter() - begin
        rates[n] = n / took
    if batch is not None:
        rates.update(batch_rates(vocab, batch))
    return ttft, first_step, decode, rates, ids


def batch_rates(vocab, run_batch) -> dict:
    """{"decodeS": tok/s} for S in BATCH_SIZES: S sequences, each after its own short prompt, decode
    BATCH_STEPS greedy tokens together, one pass of S rows per step; the rate counts every
    sequence's tokens. `run_batch(prompts, steps)` runs the prompts as sequences 0..S-1 (fresh),
    then the passes, and returns the seconds the passes took."""
    out = {}
    for S in BATCH_SIZES:
        prompts = [prompt_ids(SHORT_PROMPT, vocab, seed=100 + s) for s in range(S)]
        run_batch(prompts, 2)  # warm-up: buffers sized for S rows
        out[f"decode{S}"] = S * BATCH_STEPS / run_batch(prompts, BATCH_STEPS)
    return out


def _llama(path, threads, extra_bufts=True, logits_all=False, n_ctx=1024, n_seq_max=1, draft_model=None):
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    if n_seq_max > 1:  # Llama() takes no n_seq_max: set it in the context's defaults
        default_context = lc.llama_context_default_params

        def context_params():
            p = default_context()
            p.n_seq_max = n_seq_max
            p.kv_unified = True  # the sequences share the n_ctx cells
            return p

        lc.llama_context_default_params = context_params
    if not extra_bufts:
        # llama.cpp's AMX int8 path (an "extra buffer type") crashes with SIGSEGV on batches of more
        # than one token on machines whose kernel does not grant AMX tile state (seen in our VMs,
        # also with a Q8_0 file from llama.cpp's own quantizer); without extra buffer types it runs
        # its regular AVX-512/VNNI kernels of the quantized types.
        default_params = lc.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        lc.llama_model_default_params = params
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False, draft_model=draft_model)


def batch_llama_cpp(llm):
    """run_batch (batch_rates) on llama.cpp's own multi-sequence batches (llama_batch, one seq id a
    token), through the low-level API on the Llama object's context."""
    import llama_cpp.llama_cpp as lc

    ctx, vocab = llm._ctx.ctx, llm.n_vocab()

    def run_batch(prompts, steps):
        batch = lc.llama_batch_init(max(len(prompts), max(map(len, prompts))), 0, 1)
        try:
            def submit(entries):  # (token, position, sequence, wants logits)
                batch.n_tokens = len(entries)
                for i, (t, pos, seq, want) in enumerate(entries):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, want
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed on a batch of {len(entries)} tokens")

            def greedy(i):
                return int(np.argmax(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(vocab,))))

            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
            tokens = []
            for s, prompt in enumerate(prompts):
                submit([(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)])
                tokens.append(greedy(len(prompt) - 1))
            begin = time.perf_counter()
            for k in range(steps):
                submit([(t, len(prompts[s]) + k, s, True) for s, t in enumerate(tokens)])
                tokens = [greedy(s) for s in range(len(tokens))]
            return time.perf_counter() - begin
        finally:
            lc.llama_batch_free(batch)

    return run_batch


def child_llama_cpp(path, threads, spawned, extra_bufts=True, decode_tokens=DECODE_TOKENS, batch=False):
    llm = _llama(path, threads, extra_bufts, n_seq_max=max(BATCH_SIZES) if batch else 1)
    vocab = llm.n_vocab()

    def last_logits():  # eval() keeps no scores without logits_all: read the context's last row
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

    def start(prompt):
        llm.reset()
        llm.eval(prompt)
        return int(np.argmax(last_logits()))

    def step(token):
        llm.eval([token])
        return int(np.argmax(last_logits()))

    return measure(vocab, spawned, start, step, start, decode_tokens, batch_llama_cpp(llm) if batch else None)


def check_llama_cpp(path, threads, extra_bufts=True):
    llm = _llama(path, threads, extra_bufts, logits_all=True, n_ctx=256)
    prompt = prompt_ids(CHECK_PROMPT, llm.n_vocab(), seed=16)
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)], dtype=np.float32)
    ids, token = [], int(np.argmax(logits[-1]))
    for _ in range(CHECK_GREEDY):
        ids.append(token)
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return logits, ids, llm.tokenize(CHECK_TEXT.encode(), add_bos=True, special=False)


def lookup_child(path, threads, job, extra_bufts=True):
    """llama-cpp-python's prompt lookup (`LlamaPromptLookupDecoding`, `draft_model=`) against its
    plain decoding: `job` {"prompt": ids, "max_tokens", "ngram", "draft_max", "reps"}; greedy
    completions of the same ids, interleaved, each from an empty cache (reset(): llama-cpp-python
    would otherwise reuse the previous run's prompt); the median seconds of each and the texts."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    prompt, max_tokens = job["prompt"], job["max_tokens"]
    n_ctx = len(prompt) + max_tokens + job["draft_max"] + 16
    plain = _llama(path, threads, extra_bufts, n_ctx=n_ctx)
    lookup = _llama(path, threads, extra_bufts, n_ctx=n_ctx, draft_model=LlamaPromptLookupDecoding(
        max_ngram_size=job["ngram"], num_pred_tokens=job["draft_max"]))

    def timed(llm):
        llm.reset()
        begin = time.perf_counter()
        r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return time.perf_counter() - begin, r["choices"][0]["text"], r["usage"]["completion_tokens"]

    timed(plain), timed(lookup)  # warm-up
    runs = {"plain": [], "lookup": []}
    for _ in range(job["reps"]):
        for name, llm in (("plain", plain), ("lookup", lookup)):
            runs[name].append(timed(llm))
    out = {}
    for name, rs in runs.items():
        out[name] = {"seconds": statistics.median(r[0] for r in rs), "text": rs[-1][1], "tokens": rs[-1][2]}
    return out


def quantize_child(source, out, ftype, threads):
    """llama.cpp's own quantizer, default parameters, LLAMA_FTYPE_MOSTLY_{ftype}."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if code != 0:
        print(f"llama_model_quantize returned {code}", file=sys.stderr)
        return 1
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). getrusage's ru_maxrss would not do: Linux keeps it
    across exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv):
    mode, impl = argv[0], argv[1] if len(argv) > 1 else None
    if mode == "quantize":
        return quantize_child(argv[1], argv[2], argv[3], int(argv[4]))
    if mode == "check":
        path, threads, out = argv[2], int(argv[3]), argv[4]
        logits, ids, text_ids = check_llama_cpp(path, threads, extra_bufts=impl == "llama_cpp")
        np.save(out, logits)
        print(json.dumps({"ids": ids, "text_ids": text_ids}))
        return 0
    if mode == "lookup":
        job = json.loads(Path(argv[4]).read_text())
        print(json.dumps(lookup_child(argv[2], int(argv[3]), job, extra_bufts=impl == "llama_cpp")))
        return 0
    if mode == "measure":
        path, threads, spawned, decode_tokens = argv[2], int(argv[3]), float(argv[4]), int(argv[5])
        batch = len(argv) > 6 and argv[6] == "1"
        result = result_json(*child_llama_cpp(path, threads, spawned, impl == "llama_cpp", decode_tokens, batch))
        print(result)
        return 0
    print(f"peer.py: unknown mode {mode!r} (expected measure, check, lookup or quantize)", file=sys.stderr)
    return 2


def result_json(ttft, first_step, decode, rates, ids) -> str:
    """rates: prompt tok/s by length (128, 512), and multi-row decode's "decodeS" where measured."""
    return json.dumps({"ttft": ttft, "first_step": first_step, "decode": decode, "prefill128": rates[128],
                       "prefill512": rates[512], **{k: v for k, v in rates.items() if isinstance(k, str)},
                       "rss": peak_rss_mb(), "ids": ids})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
