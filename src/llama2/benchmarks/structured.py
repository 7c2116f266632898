"""`llama2 bench structured`: what structured output costs per token.

For each grammar (any JSON object, a JSON schema with nested objects, arrays and enums, a regex),
seeded completions are generated with the grammar; then, on the tokens they produced, three costs
are measured separately, medians over the tokens:
  - mask: llguidance computing the next-token mask (replayed on a fresh matcher, one token at a time);
    in generation this runs on the mask thread while the forward pass runs;
  - apply: turning the bitmask into -inf logits (unpack, stop tokens, np.where), on the sampling path;
  - step: a whole generation step with the grammar against the same model without one (ms/token,
    forward pass included; the difference is what the user pays).
Run it on an otherwise idle machine; it prints a table (and JSON with --json).
"""

import json
import statistics
import time

from ..errors import UsageError

GRAMMARS = {
    "json_object": ("json_object", None),
    "json_schema": ("json_schema", {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "maxItems": 3, "items": {
                "type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]},
                                                 "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
                "required": ["kind"], "additionalProperties": False}},
        },
        "required": ["name", "age", "pets"], "additionalProperties": False}),
    "regex": ("regex", r"(Once|One day), [a-z]+( [a-z]+){2,8}\."),
}


def add_arguments(p):
    p.add_argument("model", metavar="MODEL", help="a model file")
    p.add_argument("-z", "--tokenizer", help="its tokenizer.bin")
    p.add_argument("--samples", type=int, default=5, help="seeded completions per grammar (default 5)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per completion at most (default 128)")
    p.add_argument("--threads", type=int, help="compute threads (default: the cores available)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _median_us(values) -> float:
    return round(statistics.median(values) * 1e6, 1) if values else float("nan")


def measure(llama, kind, source, samples, max_tokens) -> dict:
    import numpy as np

    from .. import request
    from ..completions import completion_params
    from ..generate import Sequence
    from ..structured import Grammar, Spec

    grammar = Grammar.compile(Spec(kind, source), llama.tokenizer, llama.config.vocab_size)
    runs, with_grammar, without = [], [], []
    for seed in range(1, samples + 1):
        for g, times in ((grammar, with_grammar), (None, without)):
            body = request.validate(request.CompletionBody, dict(prompt="Once upon a time", max_tokens=max_tokens,
                                                                 temperature=1.0, top_p=0.9, seed=seed))
            params, _ = completion_params(llama.tokenizer, llama.config, body, g)
            seq = Sequence(params, llama.tokenizer)
            cache = llama.model.new_cache()
            tokens = []
            logits = llama.model.forward(seq.feed, cache)[-1]  # the prompt is not a generation step
            while True:
                t0 = time.perf_counter()
                events = seq.advance(logits)
                tokens += [e.token for e in events if e.token is not None]
                if events[-1].finish_reason is not None:
                    times.append(time.perf_counter() - t0)
                    break
                logits = llama.model.forward(seq.feed, cache)[-1]
                times.append(time.perf_counter() - t0)
            if g is not None:
                runs.append(tokens)
    mask_s, apply_s = [], []
    logits = np.zeros(llama.config.vocab_size, dtype=np.float32)
    for tokens in runs:  # replay: each cost alone, on the same tokens
        c = grammar.constraint(frozenset((llama.config.eos_id,)))
        c.close()
        for t in tokens:
            t0 = time.perf_counter()
            c.mask(logits)
            apply_s.append(time.perf_counter() - t0)
            c.matcher.consume_token(t)
            t0 = time.perf_counter()
            c._compute()
            mask_s.append(time.perf_counter() - t0)
    step_g, step_0 = statistics.median(with_grammar), statistics.median(without)
    return {"grammar": kind if kind != "json_schema" else "json_schema (nested)",
            "tokens": sum(map(len, runs)), "mask_us": _median_us(mask_s), "apply_us": _median_us(apply_s),
            "step_ms": round(step_g * 1e3, 3), "step_free_ms": round(step_0 * 1e3, 3),
            "overhead_pct": round((step_g / step_0 - 1) * 100, 1)}


def run(args, io) -> int:
    from ..llama import Llama

    if args.samples < 1 or args.max_tokens < 1:
        raise UsageError("--samples and --max-tokens must be at least 1")
    llama = Llama.load(args.model, args.tokenizer, threads=args.threads)
    llama.model.warm_up()
    rows = [measure(llama, kind, source, args.samples, args.max_tokens) for kind, source in GRAMMARS.values()]
    if args.json:
        io.out((json.dumps({"model": llama.name, "vocab": llama.config.vocab_size, "rows": rows}, indent=2)
                + "\n").encode())
        return 0
    lines = [f"model {llama.name}, vocabulary {llama.config.vocab_size}; medians per token",
             f"{'grammar':24} {'tokens':>7} {'mask us':>9} {'apply us':>9} {'step ms':>9} {'free ms':>9} {'overhead':>9}"]
    for r in rows:
        lines.append(f"{r['grammar']:24} {r['tokens']:>7} {r['mask_us']:>9} {r['apply_us']:>9} "
                     f"{r['step_ms']:>9} {r['step_free_ms']:>9} {r['overhead_pct']:>8}%")
    io.out(("\n".join(lines) + "\n").encode())
    return 0
