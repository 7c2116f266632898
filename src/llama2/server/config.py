"""The server's settings and their defaults (read by `llama2 serve` for its flags)."""

from dataclasses import dataclass

# The names a server bound to loopback answers to without --allowed-hosts (security.py).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "llama2"  # the model's id in the API
    api_key: str = None  # when set, every endpoint but /health needs 'Authorization: Bearer KEY'
    max_batch: int = 8  # active sequences (KV-cache slots)
    max_queue: int = 64  # requests waiting for a slot or KV blocks; beyond: 503
    kv_budget: int = None  # positions the shared KV pool holds (None: max_batch whole contexts;
    #                        `llama2 serve` defaults to what the memory free after the weights holds)
    prefix_cache: bool = True  # requests reuse the KV blocks of a prefix they share with earlier ones
    max_body: int = 1 << 20  # request body bytes; beyond: 413
    chat_template: object = None  # a chat_template.ChatTemplate or built-in name; None: the model's own
    refuse_long_chats: bool = False  # a chat longer than the context: 400, instead of dropping old turns
    retry_after_s: int = 1  # the Retry-After of a 503
    invariant: bool = True  # passes that keep each request's logits bit-identical to it run alone
    # connection hygiene (docs/server.md, "Limits and timeouts")
    max_connections: int = 256  # open connections; a request beyond: 503 (uvicorn's limit_concurrency)
    timeout_keep_alive: float = 5.0  # an idle keep-alive connection is closed after this many seconds
    timeout_headers: float = 10.0  # a request's line and headers must arrive within this many seconds
    timeout_body: float = 30.0  # a request's body must arrive within this many seconds; else 408
    prepare_threads: int = 2  # threads that parse, template and tokenize requests; as many compile grammars
    max_parses: int = 64  # requests waiting for or being parsed at once; beyond: 503 (server/prepare.py)
    max_compiles: int = 4  # grammar compiles waiting or running at once; beyond: 503
    # browser-facing defaults (security.py; docs/server.md, "Browsers")
    allowed_hosts: tuple = LOOPBACK_HOSTS  # Host names answered, any port; None: any Host
    cors_origins: tuple = ()  # origins whose pages may call the API cross-origin ("*": any); none
