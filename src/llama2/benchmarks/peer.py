"""The llama.cpp side of `llama2 bench`, run as a script (`python peer.py MODE ...`) in a child process.

It imports nothing of llama2 (only the standard library, numpy and llama_cpp), so the interpreter of
`--peer-python` (say a venv whose llama-cpp-python is built for AVX2 only) needs nothing else; our
own children (engine.py) import the shared parts from here. Modes, each printing one JSON line:

    measure IMPL MODEL THREADS SPAWNED DECODE_TOKENS     IMPL: llama_cpp | llama_cpp_no_extra_bufts
    check IMPL MODEL THREADS OUT.npy                     teacher-forced logits to OUT, greedy ids,
                                                         CHECK_TEXT's ids
    quantize SOURCE OUT FTYPE THREADS                    llama.cpp's quantizer (LLAMA_FTYPE_MOSTLY_*)
"""

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

SHORT_PROMPT = 8  # tokens of the prompt whose first token is the time to first token
DECODE_TOKENS = 256
CHECK_PROMPT = 16  # teacher-forced positions compared on the files of the large shapes
CHECK_GREEDY = 16  # greedy ids compared after them
# A prompt text both engines tokenize with the file's own vocabulary (BOS added, special tokens
# typed in it stay text): before timing, the two lists of ids must be equal.
CHECK_TEXT = "Once upon a time, a little robot named Max found 3 shiny stones by the river. It said: \"Hello!\""


def prompt_ids(n, vocab, seed=7):
    rng = np.random.default_rng(seed)
    return [1] + [int(t) for t in rng.integers(3, vocab, n - 1)]


def measure(vocab, spawned, start, step, prefill, decode_tokens=DECODE_TOKENS):
    """The child's measurements, for any engine given as three functions: `start(prompt)` runs a
    prompt on a fresh context and returns the greedy token, `step(token)` feeds one token and returns
    the next greedy one, `prefill(prompt)` runs a prompt on a fresh context."""
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
    return ttft, first_step, decode, rates, ids


def _llama(path, threads, extra_bufts=True, logits_all=False, n_ctx=1024):
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

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
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def child_llama_cpp(path, threads, spawned, extra_bufts=True, decode_tokens=DECODE_TOKENS):
    llm = _llama(path, threads, extra_bufts)
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

    return measure(vocab, spawned, start, step, start, decode_tokens)


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
    if mode == "measure":
        path, threads, spawned, decode_tokens = argv[2], int(argv[3]), float(argv[4]), int(argv[5])
        result = result_json(*child_llama_cpp(path, threads, spawned, impl == "llama_cpp", decode_tokens))
        print(result)
        return 0
    print(f"peer.py: unknown mode {mode!r} (expected measure, check or quantize)", file=sys.stderr)
    return 2


def result_json(ttft, first_step, decode, prefill, ids) -> str:
    return json.dumps({"ttft": ttft, "first_step": first_step, "decode": decode, "prefill128": prefill[128],
                       "prefill512": prefill[512], "rss": peak_rss_mb(), "ids": ids})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
