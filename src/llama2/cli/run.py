"""`llama2 run`: generate or chat, taking both the short form and llama2.c run.c's flags.

    llama2 run                                   # stories15M.bin, "Once upon a time"
    llama2 run 'Long long ago'                   # default model, this prompt
    llama2 run -m stories42M.bin 'Long long ago'
    llama2 run CHECKPOINT [-t T] [-p P] [-s SEED] [-n STEPS] [-i PROMPT] [-z TOKENIZER]
               [-m generate|chat] [-y SYSTEM]    # exactly as run.c; the prompt defaults to ""
    llama2 run 'A cat:' --json-schema cat.json   # structured output (also --regex RE, --grammar FILE)
    llama2 run hf:ORG/REPO:Q4_K_M 'Hello'       # from the Hugging Face hub (or hf:ORG/REPO/FILE)
    llama2 run CODELLAMA --mode infill --prefix 'def f(x):' --suffix '    return y'   # the middle
    llama2 run -m big.gguf --draft small.gguf     # speculative decoding (or --lookup N: no draft model)
    llama2 run BASE --lora out/ --lora-scale 0.5 'Once'   # a LoRA adapter, unmerged (repeatable: they sum)

stdout carries exactly the bytes run.c prints; "achieved tok/s" goes to stderr.
"""

import argparse
import math
import os
import time
from pathlib import Path

from ..chat_template import override
from ..config import DEFAULT_MODEL, DEFAULT_PROMPT, GENERATION
from ..errors import FormatError, UsageError
from ..fileio import read_user_text
from .. import formats, kvcache
from ..quantize.mix import QUANTIZE_HELP, QUANTIZE_TYPES

MODES = ("generate", "chat", "infill")
MODEL_SUFFIXES = (".bin", ".gguf", ".safetensors")


def register(sub):
    p = sub.add_parser("run", help="generate a story or chat with a model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("words", nargs="*", metavar="[CHECKPOINT] [PROMPT]",
                   help="a model file (run.c style, first) and/or a prompt")
    p.add_argument("-t", "--temperature", type=float, default=GENERATION.temperature,
                   help=f"sampling temperature, 0 = greedy (default {GENERATION.temperature})")
    p.add_argument("-p", "--top-p", type=float, default=GENERATION.top_p,
                   help=f"top-p (nucleus) sampling in [0, 1]; 0 or 1 disables it (default {GENERATION.top_p})")
    p.add_argument("-s", "--seed", type=int, default=GENERATION.seed,
                   help="random seed; 0 or less means from the clock (default)")
    p.add_argument("-n", "--steps", type=int, default=GENERATION.steps,
                   help=f"positions to run, prompt included; 0 = the whole context (default {GENERATION.steps})")
    p.add_argument("-i", "--prompt", help="the prompt")
    p.add_argument("-z", "--tokenizer", help="tokenizer.bin to use (default: tokenizer.bin)")
    p.add_argument("-m", dest="m", metavar="MODE|MODEL",
                   help="'generate' or 'chat' (as run.c), or else a model file")
    p.add_argument("--model", help="the model file (default %s)" % DEFAULT_MODEL)
    p.add_argument("--mode", choices=MODES, help="generate (default), chat, or infill (fill in the "
                   "middle between --prefix and --suffix: Code Llama)")
    p.add_argument("-y", "--system", help="system prompt, chat mode")
    p.add_argument("--prefix", help="infill mode: the text before the middle (default: the prompt)")
    p.add_argument("--suffix", help="infill mode: the text after the middle")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every kernel, BLAS included (default: the cores available)")
    p.add_argument("--quantize", choices=QUANTIZE_TYPES, default=None, metavar="TYPE",
                   help=QUANTIZE_HELP)
    p.add_argument("--kv-type", choices=tuple(kvcache.TYPES), default=None, metavar="TYPE",
                   help=kvcache.help_text(formats.default_kv_types()))
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="chat mode's prompt format: llama2, chatml or a Jinja template file "
                        "(default: the model's own, else llama2 as run.c)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE",
                       help="structured output (each reply in chat mode): JSON valid against this schema")
    shape.add_argument("--regex", metavar="RE", help="structured output: the generated text matches RE")
    shape.add_argument("--grammar", metavar="FILE",
                       help="structured output: the generated text follows this Lark or GBNF grammar")
    add_speculation(p)
    add_lora(p, named=False)
    p.set_defaults(func=run)


class _LoRAFlag(argparse.Action):
    """--lora and --lora-scale, kept in the order given (a scale belongs to the --lora before it)."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (option_string, value)])


def add_lora(p, named: bool):
    """--lora [NAME=]DIR and --lora-scale S, repeatable (llama2 run: they sum; llama2 serve: each
    NAME is a model a request may name)."""
    if named:
        what, meaning = "NAME=DIR", ("serve this LoRA adapter (a folder with PEFT's files or ours, or an adapter "
                                     ".gguf) unmerged as model NAME beside the base; repeatable")
    else:
        what, meaning = "DIR", ("apply this LoRA adapter (a folder with PEFT's files or ours, or an adapter "
                                ".gguf) unmerged; repeatable, the adapters sum")
    p.add_argument("--lora", dest="lora", action=_LoRAFlag, metavar=what, help=meaning)
    p.add_argument("--lora-scale", dest="lora", action=_LoRAFlag, type=float, metavar="S",
                   help="scale of the --lora before it (default 1): W x + S * alpha / rank * B A x")


def lora_flags(flags) -> list:
    """[(value, scale), ...] of --lora and --lora-scale in order; each path checked to exist."""
    out = []
    for option, value in flags or ():
        if option == "--lora":
            out.append([value, 1.0, False])
            path = value.partition("=")[2] if "=" in value and not os.path.lexists(value) else value
            if not os.path.lexists(path):
                raise UsageError(f"--lora {value}: no such file or folder")
        elif not out or out[-1][2]:
            raise UsageError(f"--lora-scale {value}: give one after each --lora it scales")
        elif not math.isfinite(value):
            raise UsageError(f"--lora-scale {value}: expected a finite number")
        else:
            out[-1][1:] = [value, True]
    return [(value, scale) for value, scale, _ in out]


def add_speculation(p):
    """--draft, --lookup and --draft-max (llama2 run and llama2 serve)."""
    from ..speculative import MAX_DRAFT

    how = p.add_mutually_exclusive_group()
    how.add_argument("--draft", metavar="MODEL",
                     help="speculative decoding: this smaller model (same vocabulary) proposes tokens, "
                          "the model checks them in one pass; the output keeps the model's distribution")
    how.add_argument("--lookup", type=int, metavar="N",
                     help="speculative decoding without a draft model: propose the tokens that followed "
                          "the latest earlier occurrence of the text's last N tokens")
    p.add_argument("--draft-max", type=int, default=MAX_DRAFT, metavar="K",
                   help=f"the longest draft; its length adapts below that to what gets accepted (default {MAX_DRAFT})")


def _looks_like_model(word: str) -> bool:
    from ..hub import HF_PREFIX
    if word.startswith(HF_PREFIX):  # a model on the Hugging Face hub
        return True
    # anything that exists at that path (a FIFO, /dev/zero, a broken link too) is a model to load,
    # which then says what is wrong with it, not a prompt
    return Path(word).suffix in MODEL_SUFFIXES or os.path.lexists(word)


def parse(args):
    """Resolve the two CLI styles into (model, prompt, mode, prompt_given)."""
    mode, model = args.mode, args.model
    if args.m is not None:
        if args.m in MODES:
            mode = mode or args.m
        elif model is None:
            model = args.m
        else:
            raise UsageError(f"-m {args.m!r}: expected one of {', '.join(MODES)} (the model is given by --model)")
    words = list(args.words)
    positional_model = False
    if model is None and words and (len(words) >= 2 or _looks_like_model(words[0])):
        model, positional_model = words.pop(0), True
    if len(words) > 1:
        raise UsageError(f"unexpected argument {words[1]!r}: quote a prompt of several words")
    if words and args.prompt is not None:
        raise UsageError(f"prompt given twice: {words[0]!r} and -i {args.prompt!r}")
    prompt = words[0] if words else args.prompt
    given = prompt is not None
    if prompt is None:
        prompt = "" if positional_model else DEFAULT_PROMPT
    if not math.isfinite(args.temperature):
        raise UsageError(f"-t {args.temperature}: temperature must be a finite number >= 0")
    if args.temperature < 0:
        raise UsageError(f"-t {args.temperature}: temperature must be >= 0")
    if not 0 <= args.top_p <= 1:
        raise UsageError(f"-p {args.top_p}: top-p must be in [0, 1]")
    if args.steps < 0:
        raise UsageError(f"-n {args.steps}: steps must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: expected at least 1")
    mode = mode or GENERATION.mode
    if mode != "infill":
        for flag in ("prefix", "suffix"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag}: only in --mode infill")
    elif args.prefix is not None and given:
        raise UsageError(f"prefix given twice: the prompt {prompt!r} and --prefix {args.prefix!r}")
    elif args.suffix is None:
        raise UsageError("--mode infill needs --suffix (the text after the middle)")
    return model or DEFAULT_MODEL, prompt, mode, given


def structured_spec(args):
    """The structured-output Spec the flags ask for, or None; files read and checked here."""
    from ..structured import GrammarError, Spec, read_schema
    if args.regex is not None:
        return Spec("regex", args.regex)
    flag, path = ("--json-schema", args.json_schema) if args.json_schema is not None else ("--grammar", args.grammar)
    if path is None:
        return None
    try:
        text = read_user_text(path, "JSON schema file" if flag == "--json-schema" else "grammar file")
    except FormatError as e:
        raise UsageError(f"{flag} {e}") from None
    if flag == "--grammar":
        return Spec("grammar", text)
    try:
        schema = read_schema(text)  # the server's one check: valid JSON, an object, at most 64 deep
    except GrammarError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    return Spec("json_schema", schema)


def _grammar(args, llama):
    from ..structured import Grammar, GrammarError
    spec = structured_spec(args)
    if spec is None:
        return None
    flag = {"regex": "--regex", "json_schema": "--json-schema", "grammar": "--grammar"}[spec.kind]
    what = args.regex if spec.kind == "regex" else args.json_schema or args.grammar
    try:
        return Grammar.compile(spec, llama.tokenizer, llama.config.vocab_size)
    except GrammarError as e:
        raise UsageError(f"{flag} {what}: cannot be compiled: {e}") from None


def run(args, io) -> int:
    from ..llama import Llama
    from ..sampler import Sampler

    from .. import hub, memory

    model_path, prompt, mode, prompt_given = parse(args)
    lora = lora_flags(args.lora) or None
    structured_spec(args)  # a bad schema or grammar file fails before the model loads
    template = override(args.chat_template) if args.chat_template else None
    model_path = hub.resolve(model_path, what="model")
    with memory.guard(model_path, quantize=args.quantize, slots=1, kv_type=args.kv_type):  # one context
        llama = Llama.load(model_path, args.tokenizer, quantize=args.quantize, threads=args.threads,
                           kv_type=args.kv_type, chat_template=template, draft=args.draft,
                           lookup=args.lookup, draft_max=args.draft_max, lora=lora)
    grammar = _grammar(args, llama)
    sampler = Sampler(llama.config.vocab_size, args.temperature, args.top_p, args.seed)
    if mode == "chat":
        return _chat(llama, sampler, prompt if prompt_given else None, args.system, args.steps, io,
                     llama.chat_template, grammar)
    if mode == "infill":
        return _infill(llama, sampler, args.prefix if args.prefix is not None else prompt if prompt_given else "",
                       args.suffix, args.steps, io, model_path, grammar)
    from ..generate import generate

    start, count = None, 0
    for event in generate(llama.model, llama.tokenizer, sampler, llama.encode(prompt), args.steps,
                          grammar=grammar, speculator=llama.speculator):
        if event.raw:
            io.out(event.raw)
        if event.token is not None:
            count += 1
            if start is None:
                start = time.perf_counter()
    io.out(b"\n")
    if start is not None and count > 1:
        io.err(f"achieved tok/s: {(count - 1) / (time.perf_counter() - start):f}\n")
    return 0


def _infill(llama, sampler, prefix, suffix, steps, io, model_path, grammar) -> int:
    """Print the middle the model writes between `prefix` and `suffix`, up to its end token."""
    from .. import infill
    from ..generate import Params, complete, resolve_steps

    fim = infill.fim_tokens(llama.tokenizer)
    if fim is None:
        raise UsageError(f"--mode infill: {infill.missing_message(model_path)}")
    ids = infill.prompt(llama.tokenizer, fim, prefix, suffix)
    steps = resolve_steps(steps, llama.config.seq_len)
    if len(ids) > steps:
        raise UsageError(f"--mode infill: the prompt is {len(ids)} tokens, more than -n {steps} positions")
    c = llama.config
    params = Params(tuple(ids), max_tokens=steps - len(ids) + 1, temperature=sampler.temperature,
                    top_p=sampler.top_p, seed=sampler.seed,
                    stop_tokens=frozenset({c.bos_id, c.eos_id, fim.end} | llama.tokenizer.end_ids),
                    grammar=grammar)
    for event in complete(llama.model, params, llama.tokenizer, sampler=sampler):
        if event.raw:
            io.out(event.raw)
    io.out(b"\n")
    return 0


def _readline(io, guide: str):
    """run.c's read_stdin: print the guide, read one line; None at end of input."""
    io.out(guide.encode())
    try:
        line = io.stdin.readline()
        line.encode("utf-8")  # a line read with surrogateescape holds its bad bytes as surrogates
    except UnicodeError:
        raise UsageError("stdin: a line is not valid UTF-8 text") from None
    if not line:
        return None
    return line[:-1] if line.endswith("\n") else line


def _chat(llama, sampler, user_prompt, system_prompt, steps, io, template="llama2", grammar=None) -> int:
    from ..chat import ChatSession

    session = ChatSession(llama, sampler, steps, template, grammar)
    first = True
    while True:
        if first and system_prompt is None:
            system_prompt = _readline(io, "Enter system prompt (optional): ")
            if system_prompt is None:
                break
        if first and user_prompt is not None:
            user = user_prompt
        else:
            user = _readline(io, "User: ")
            if user is None:
                break
        io.out(b"Assistant: ")
        finish = None
        for event in session.turn(user, system_prompt if first else ""):
            if event.raw:
                io.out(event.raw)
            finish = event.finish_reason
        first = False
        if finish == "stop":
            io.out(b"\n")
        elif finish == "length":
            io.out(b"\n")
            io.err(f"llama2: the conversation reached its {session.steps}-position limit (-n)\n")
            break
    io.out(b"\n")
    return 0
