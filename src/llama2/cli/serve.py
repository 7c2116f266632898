"""`llama2 serve MODEL`: an OpenAI-compatible HTTP server (Starlette + uvicorn) on loopback.

    llama2 serve stories15M.bin                      # http://127.0.0.1:8000/v1
    llama2 serve model.bin -z tok.bin --port 0       # any free port; the address goes to stderr
    llama2 serve model.bin --host 0.0.0.0 --api-key KEY
    llama2 serve model.bin --lora poems=out/poems --lora tales=tales.gguf   # "model": "poems" picks one

Requests run in one batching scheduler (see docs/server.md). SIGTERM or Ctrl-C stops accepting
connections, lets requests in flight finish (up to SHUTDOWN_GRACE_S), then exits.
"""

import argparse
import dataclasses
import ipaddress
import math
import os
import signal
import socket
from pathlib import Path

from ..errors import Llama2Error, UsageError
from .. import formats, kvcache
from ..quantize.mix import QUANTIZE_HELP, QUANTIZE_TYPES
from .run import add_lora, add_speculation, lora_flags

SHUTDOWN_GRACE_S = 30  # seconds in-flight requests get to finish after SIGTERM; then they are cancelled


def register(sub):
    from ..server.config import ServerConfig

    d = ServerConfig()
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="the model file")
    p.add_argument("-z", "--tokenizer", help="tokenizer.bin to use (default: tokenizer.bin)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=d.api_key, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"sequences decoded together, one KV-cache slot each (default {d.max_batch})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting for a slot before 503 (default {d.max_queue})")
    p.add_argument("--threads", type=int, help="threads for every kernel, BLAS included (default: the cores available)")
    p.add_argument("--quantize", choices=QUANTIZE_TYPES, default=None, metavar="TYPE",
                   help=QUANTIZE_HELP)
    p.add_argument("--kv-type", choices=tuple(kvcache.TYPES), default=None, metavar="TYPE",
                   help=kvcache.help_text(formats.default_kv_types()))
    p.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS",
                   help="positions the shared KV cache holds for all requests together, in blocks of "
                        f"{kvcache.BLOCK_TOKENS} (default: what the memory free after the weights holds, "
                        "at most --max-batch whole contexts; printed at start)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the KV blocks of a prefix shared with earlier requests (each "
                        "request's logits then equal it run alone to the bit)")
    p.add_argument("--model-alias", help="the model's name in the API (default: the file name's stem)")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="how chat messages become a prompt: llama2, chatml or a Jinja template file "
                        "(default: the model's own, else llama2 as run.c)")
    p.add_argument("--refuse-long-chats", action="store_true",
                   help="answer a chat whose history does not fit the context with a 400, instead of "
                        "leaving out its oldest turns (the system prompt stays; usage.dropped_messages "
                        "says how many)")
    p.add_argument("--max-body", type=int, default=d.max_body,
                   help=f"largest request body in bytes (default {d.max_body})")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections at most; a request beyond gets 503 (default {d.max_connections})")
    p.add_argument("--timeout-keep-alive", type=float, default=d.timeout_keep_alive, metavar="S",
                   help=f"close a keep-alive connection idle this long (default {d.timeout_keep_alive:g})")
    p.add_argument("--timeout-headers", type=float, default=d.timeout_headers, metavar="S",
                   help="close a connection whose request line and headers take longer "
                        f"(default {d.timeout_headers:g})")
    p.add_argument("--timeout-body", type=float, default=d.timeout_body, metavar="S",
                   help=f"answer 408 and close when a request body takes longer (default {d.timeout_body:g})")
    p.add_argument("--allowed-hosts", metavar="NAMES", type=_names,
                   help="comma-separated Host names the server also answers to, '*' for any (default: "
                        "on loopback only localhost, 127.0.0.1 and [::1]; elsewhere any); a request "
                        "naming another host gets 421, the defence against DNS rebinding")
    p.add_argument("--cors-origins", metavar="ORIGINS", type=_names, default=d.cors_origins,
                   help="comma-separated origins (https://app.example) whose web pages may call the API, "
                        "'*' for any (default: none, no CORS headers)")
    p.add_argument("--one-pass", action="store_true",
                   help="run each step's prompts and decodes in a single forward pass (by default they "
                        "share passes only as far as every request keeps its bits alone): fewer passes, "
                        "but a request's logits may then differ in the last bits from it run alone")
    add_speculation(p)  # every slot drafts; the guesses are verified in the batched passes
    add_lora(p, named=True)
    p.set_defaults(func=run)


def _names(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected names separated by commas")
    return names


def named_adapters(flags, model_name: str) -> dict:
    """{NAME: [(DIR, scale)]} of `--lora NAME=DIR [--lora-scale S]` (DIR alone: named after its
    file or folder); each name unique and not the base model's."""
    adapters = {}
    for value, scale in flags:
        name, eq, path = value.partition("=")
        if not eq or os.path.lexists(value):
            name, path = Path(value).stem, value
        why = "empty" if not name else "the base model's" if name == model_name else "taken" if name in adapters else None
        if why:
            raise UsageError(f"--lora {value}: the name {name!r} is {why}; give NAME=DIR with a name of its own")
        adapters[name] = [(path, scale)]
    return adapters


def allowed_hosts(names, bound: str):
    """ServerConfig.allowed_hosts for `--allowed-hosts names` on a socket bound to `bound`: the
    loopback names plus `names`; any Host (None) with '*', or without the flag off loopback."""
    from ..server.config import LOOPBACK_HOSTS

    if names is None:
        return LOOPBACK_HOSTS if ipaddress.ip_address(bound).is_loopback else None
    return None if "*" in names else LOOPBACK_HOSTS + names


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise Llama2Error(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


# Share of the memory free after the weights that the KV pool takes by default (the rest: the
# process's own buffers, the page cache, other programs).
KV_SHARE = 0.8


def kv_budget(args, llama, model_path, io) -> int:
    """--kv-budget, or what KV_SHARE of the memory free after the weights holds (at most
    --max-batch whole contexts, at least one block); printed either way."""
    from .. import memory

    c, kv_type = llama.config, llama.model.kv_type
    per = memory.kv_position_bytes(c, kv_type)
    budget = args.kv_budget
    how = "--kv-budget"
    if budget is None:
        free = memory.available().memory
        path = Path(model_path)
        weights = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
            else path.stat().st_size
        most = args.max_batch * c.seq_len
        budget = most if free is None else max(kvcache.BLOCK_TOKENS, min(most, int(KV_SHARE * max(0, free - weights) / per)))
        how = "default: --max-batch contexts" if budget == most else "default: the memory free after the weights"
    budget = -(-budget // kvcache.BLOCK_TOKENS) * kvcache.BLOCK_TOKENS
    io.err(f"llama2 serve: KV cache {kv_type}, {budget} positions shared by all requests ({how}; "
           f"{memory.gb(memory.kv_cache_bytes(c, kv_type, budget))} at most, {per / 1024:g} KiB per "
           "position, committed as used)\n")
    return budget


def run(args, io) -> int:
    if args.max_batch < 1:
        raise UsageError(f"--max-batch {args.max_batch}: must be at least 1")
    if args.kv_budget is not None and args.kv_budget < 1:
        raise UsageError(f"--kv-budget {args.kv_budget}: must be at least 1 position")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue {args.max_queue}: must be 0 or more")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be in 0..65535")
    if args.max_body < 1:
        raise UsageError(f"--max-body {args.max_body}: must be at least 1")
    if args.max_connections < 1:
        raise UsageError(f"--max-connections {args.max_connections}: must be at least 1")
    for flag in ("timeout_keep_alive", "timeout_headers", "timeout_body"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{flag.replace('_', '-')} {value}: expected a number of seconds > 0")
    from ..chat_template import override

    template = override(args.chat_template) if args.chat_template else None
    model_name = args.model_alias or Path(args.model).stem
    adapters = named_adapters(lora_flags(args.lora), model_name)
    try:
        import uvicorn

        from ..server.app import create_app
        from ..server.connection import protocol
    except ImportError as e:
        raise Llama2Error(f"llama2 serve needs starlette, uvicorn and pydantic ({e}); "
                          "pip install 'llama2[serve]'") from None
    from ..llama import Llama
    from ..server.config import ServerConfig

    from .. import hub, memory, native

    model_path = hub.resolve(args.model, what="model")
    # --kv-budget's pool must fit; by default the pool is sized after loading, from what is free
    # then, so the model needs room for one whole context
    with memory.guard(model_path, quantize=args.quantize, slots=1, kv_type=args.kv_type,
                      kv_positions=args.kv_budget, budget_flag="--kv-budget" if args.kv_budget else None):
        llama = Llama.load(model_path, args.tokenizer, quantize=args.quantize, threads=args.threads,
                           kv_type=args.kv_type, draft=args.draft, lookup=args.lookup,
                           draft_max=args.draft_max, slots=args.max_batch, adapters=adapters or None)
    config = ServerConfig(model_name=model_name, api_key=args.api_key,
                          max_batch=args.max_batch, max_queue=args.max_queue, max_body=args.max_body,
                          kv_budget=kv_budget(args, llama, model_path, io),
                          prefix_cache=not args.no_prefix_cache,
                          chat_template=template, refuse_long_chats=args.refuse_long_chats,
                          invariant=not args.one_pass,
                          max_connections=args.max_connections, timeout_keep_alive=args.timeout_keep_alive,
                          timeout_headers=args.timeout_headers, timeout_body=args.timeout_body,
                          cors_origins=args.cors_origins)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    config = dataclasses.replace(config, allowed_hosts=allowed_hosts(args.allowed_hosts, host))
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"

    def ready(app):
        io.err(f"llama2 serve: {config.model_name} at {url} (max batch {config.max_batch}, "
               f"max queue {config.max_queue}, kernels {native.describe()})\n")
        if not config.api_key and not ipaddress.ip_address(host).is_loopback:
            io.err(f"llama2 serve: warning: listening on {host} without --api-key: anyone who can "
                   "reach this port can use the model\n")

    app = create_app(llama, config, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                                           http=protocol(config.timeout_headers),
                                           timeout_keep_alive=config.timeout_keep_alive,
                                           limit_concurrency=config.max_connections))
    # uvicorn re-raises the signal that stopped it once it has shut down: let that one pass, so a
    # SIGTERM ends in a clean exit (0) rather than death by the default handler.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    io.err("llama2 serve: stopped\n")
    return 0
