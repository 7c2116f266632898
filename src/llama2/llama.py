"""`Llama`: the Python API. A loaded model plus its tokenizer: run.c-style `generate`, teacher-forced
`logits`, and llama-cpp-python-style `create_completion` / `create_chat_completion`, which return
the OpenAI-shaped dicts (or chunk iterators) that the server sends, built by the same code
(llama2.completions)."""

from pathlib import Path

import numpy as np

from . import completions as C
from . import hub
from .threads import set_threads
from .config import DEFAULT_TOKENIZER, GENERATION
from .errors import FormatError, UsageError
from .chat_template import resolve as resolve_template, token_texts
from .generate import Event, complete, generate
from .formats import load_checkpoint
from .model import Transformer
from .sampler import Sampler
from .tokenizer import Tokenizer


def find_tokenizer(checkpoint_path, name=None) -> Path:
    """The tokenizer to use: `name` as given or cached; without one, `tokenizer.bin` in the current
    folder (as run.c), beside the checkpoint (inside it for a model directory), or in the cache
    (downloaded on first use)."""
    if name is not None:
        return hub.resolve(name, what="tokenizer")
    path = Path(checkpoint_path)
    folder = path if path.is_dir() else path.parent  # a model directory holds its own files
    for candidate in (Path(DEFAULT_TOKENIZER), folder / DEFAULT_TOKENIZER):
        if candidate.is_file():
            return candidate
    return hub.resolve(DEFAULT_TOKENIZER, what="tokenizer")


class Llama:
    """A model ready to run: `Llama.load("stories15M.bin")`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, checkpoint=None, name: str = "llama2",
                 chat_template=None, speculator=None, path=None):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.config = model.config
        self.name = name  # the "model" field of create_completion's answers (the server's model id)
        # how chats become prompts (a chat_template.ChatTemplate or a built-in name): the one given,
        # else the model's own, else run.c's Llama 2 template
        self.chat_template = chat_template or getattr(checkpoint, "chat_template", None) or "llama2"
        self.speculator = speculator  # a speculative.Speculator: completions draft and verify
        self.path = path  # the checkpoint's file, as given

    @classmethod
    def load(cls, checkpoint, tokenizer=None, quantize=None, threads=None, kv_type=None,
             chat_template=None, draft=None, lookup=None, draft_max=None, slots=1, lora=None,
             adapters=None) -> "Llama":
        """Load a checkpoint (path; downloaded if it is a known default) and its tokenizer (a path, a
        Tokenizer, or None: the checkpoint's own vocabulary if it has one, else tokenizer.bin).
        `quantize` turns float weights into a quantized type at load: "q8_0" (our int8), "q4_0" ...
        "q6_k", or llama.cpp's mixes "q4_k_m", "q5_k_m" (each tensor in the type llama.cpp's
        quantizer gives it; see weights.quantizer); `threads` (default: all cores) applies to
        every kernel, BLAS included. `kv_type` (a name of kvcache.TYPES) is the KV cache's type; by
        default the model format's (its reader's KV_TYPE). `chat_template` (a
        chat_template.ChatTemplate, or "llama2" / "chatml") replaces the model's own.

        Speculative decoding (llama2.speculative): `draft` (a path, loaded with the same tokenizer
        argument, or a Llama) proposes tokens that the model verifies, its vocabulary checked
        against the model's; or `lookup` N proposes tokens found after the latest earlier
        occurrence of the text's last N tokens. `draft_max`: the longest draft (default
        speculative.MAX_DRAFT), its length adapting below that; `slots`: sequences the draft's
        cache holds (the server's batch). A draft file without a vocabulary of its own (llama2.c's)
        uses the model's tokenizer.

        LoRA adapters (llama2.lora), applied unmerged so a quantized base stays as stored: `lora`
        (a folder with PEFT's files or ours, an adapter .gguf, or a list of those and (path,
        scale) pairs, which sum) adapts every generation; `adapters` ({name: the same}) are
        loaded side by side for the server, where a request's `model` field picks one by name
        and the base answers to its own. Each is checked against the model's shapes (FormatError
        naming the file)."""
        from . import lora as L
        if lora is not None and adapters is not None:
            raise UsageError("lora and adapters: give one of them (adapters are picked per request)")
        set_threads(threads)
        path = hub.resolve(checkpoint, what="model")
        ckpt = load_checkpoint(path)
        vocab = ckpt.config.vocab_size
        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        elif tokenizer is None and getattr(ckpt, "tokenizer", None) is not None:
            tok = ckpt.tokenizer
        else:
            tok = Tokenizer.load(find_tokenizer(path, tokenizer), vocab_size=vocab)
        if tok.vocab_size < vocab:
            raise FormatError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model's "
                              f"vocabulary has {vocab}")
        named = {} if adapters is None else dict(adapters)
        loaded = [L.load(spec, ckpt.config, name) for name, spec in named.items()]
        if lora is not None:
            loaded = [L.load(lora, ckpt.config)]
        model = Transformer(ckpt, quantize=quantize, kv_type=kv_type, adapters=loaded,
                            adapter=0 if lora is not None else -1)
        llama = cls(model, tok, ckpt, name=Path(path).stem, chat_template=chat_template, path=path)
        llama.speculator = llama.speculate(draft, lookup, draft_max, slots, kv_type)
        return llama

    def speculate(self, draft=None, lookup=None, draft_max=None, slots=1, kv_type=None):
        """The speculative.Speculator of a draft model (a path or a Llama) or of prompt lookup
        (`lookup`: the n-gram size), None for neither (see `load`)."""
        from . import speculative as S
        if draft is not None and lookup is not None:
            raise UsageError("--draft and --lookup: give one of them, not both")
        most = S.MAX_DRAFT if draft_max is None else draft_max
        if draft is not None:
            if not isinstance(draft, Llama):
                draft = self._load_draft(draft, kv_type)
            return S.Speculator(S.DraftModel.checked(draft, self, slots), self.model, most)
        if lookup is not None:
            return S.Speculator(S.PromptLookup(lookup), self.model, most)
        return None

    def _load_draft(self, path, kv_type=None) -> "Llama":
        """A draft model's file, with its own vocabulary if it has one (checked against ours by
        speculative.DraftModel.checked), else ours (a llama2.c file has none)."""
        path = hub.resolve(path, what="draft model")
        ckpt = load_checkpoint(path)
        if ckpt.config.vocab_size != self.config.vocab_size:
            raise FormatError(f"{path}: the draft's vocabulary differs from the model's "
                              f"({ckpt.config.vocab_size} tokens, the model has {self.config.vocab_size})")
        tok = getattr(ckpt, "tokenizer", None) or self.tokenizer
        return Llama(Transformer(ckpt, kv_type=kv_type), tok, ckpt, name=Path(path).stem, path=path)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str = None, quant: str = None, **kwargs) -> "Llama":
        """Download a model from the Hugging Face hub (llama-cpp-python's name for it) and load it:
        `filename` (a glob allowed, e.g. "*q8_0.gguf") names the file; without it, `quant` (or
        llama.cpp's default, Q4_K_M) picks the GGUF file, and a repo without GGUF files gives its
        safetensors folder. Other arguments as `load`. See llama2.hub.from_hub."""
        return cls.load(hub.from_hub(repo_id, filename, quant), **kwargs)

    def encode(self, text, bos=True, eos=False) -> list:
        return self.tokenizer.encode(text, bos=bos, eos=eos)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text `messages` ([{"role", "content"}]) become, as transformers'
        apply_chat_template(messages, tokenize=False, add_generation_prompt=...) renders the same
        template. Raises chat_template.TemplateError (naming the model's file) when it refuses."""
        template = resolve_template(self.chat_template)
        return template.render(messages, add_generation_prompt, *token_texts(self.tokenizer))

    def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits, float32 [len(token_ids), vocab], through the same forward pass."""
        ids = list(token_ids)
        cache = self.model.new_cache()
        return self.model.forward(ids, cache, all_logits=True)

    def stream(self, prompt="", steps=GENERATION.steps, temperature=GENERATION.temperature,
               top_p=GENERATION.top_p, seed=GENERATION.seed):
        """Yield generation Events (see llama2.generate.Event); prompt tokens are echoed first."""
        sampler = Sampler(self.config.vocab_size, temperature, top_p, seed)
        yield from generate(self.model, self.tokenizer, sampler, self.encode(prompt), steps,
                            speculator=self.speculator)

    def generate(self, prompt="", steps=GENERATION.steps, temperature=GENERATION.temperature,
                 top_p=GENERATION.top_p, seed=GENERATION.seed):
        """Yield the text pieces of a completion of `prompt` (the prompt itself is not repeated),
        with run.c's meaning of every argument: `steps` counts positions, prompt included (run.c's
        -n; 0 means the whole context), a seed of 0 means the clock, generation stops at BOS or EOS.
        For OpenAI's meaning (max_tokens, stop strings, logprobs, structured output) use
        `create_completion`."""
        for event in self.stream(prompt, steps, temperature, top_p, seed):
            if not event.is_prompt and event.text:
                yield event.text

    def __call__(self, prompt="", **kwargs) -> str:
        return "".join(self.generate(prompt, **kwargs))

    # -- OpenAI-shaped, as llama-cpp-python ---------------------------------------------------

    def create_completion(self, prompt, max_tokens=C.COMPLETION_MAX_TOKENS, temperature=GENERATION.temperature,
                          top_p=GENERATION.top_p, seed=None, stop=None, stream=False, logprobs=None,
                          echo=False, response_format=None, grammar=None, include_usage=False, suffix=None):
        """A text completion as OpenAI's /v1/completions answers it (a dict), or with `stream=True`
        an iterator of its chunks (`include_usage`: a last chunk with the usage).

        `prompt`: a string (encoded with BOS) or token ids. `max_tokens`: sampled tokens at most
        (None: the rest of the context). `seed`: None or <= 0 draws one. `stop`: strings that end
        the text (never part of it). `logprobs`: k in 0..5 gives each sampled token's log
        probability and the k most likely. `response_format`: OpenAI's ({"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}); `grammar`: GBNF
        text, a llama2.structured.Spec (regex, Lark, GBNF, JSON schema) or a compiled Grammar.
        `suffix` (OpenAI's): the text after the completion, which then fills the middle (Code
        Llama's infilling; models without its tokens refuse it). Raises errors.RequestError naming
        the argument at fault (validated by llama2.request)."""
        from . import request  # pydantic: only completions need it
        body = request.validate(request.CompletionBody, dict(
            prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
            logprobs=logprobs, response_format=response_format, grammar=grammar, suffix=suffix))
        params, text = C.completion_params(self.tokenizer, self.config, body,
                                           C.compile_structure(body, self.tokenizer, self.config.vocab_size))
        answer = C.Answer(False, self.name, self.tokenizer, len(params.prompt), text if echo else "",
                          logprobs=params.logprobs is not None)
        return self._answer(answer, params, stream, include_usage)

    def create_chat_completion(self, messages, max_tokens=None, temperature=GENERATION.temperature,
                               top_p=GENERATION.top_p, seed=None, stop=None, stream=False, logprobs=False,
                               top_logprobs=None, response_format=None, grammar=None, include_usage=False,
                               drop_turns=True):
        """A chat completion as OpenAI's /v1/chat/completions answers it (a dict), or with
        `stream=True` an iterator of `chat.completion.chunk` dicts. `messages`: [{"role", "content"}]
        (system first if any, then user and assistant alternating, ending with a user message),
        rendered with the model's chat template. `max_tokens` None: the rest of the context.
        `logprobs=True` gives each token's log probability, `top_logprobs` (0..20) the most likely
        alternatives. A history longer than the context loses its oldest turns (the system prompt
        stays; usage["dropped_messages"] counts them), or with `drop_turns=False` is refused.
        Other arguments as create_completion."""
        from . import request  # pydantic: only completions need it
        body = request.validate(request.ChatBody, dict(
            messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop=stop, logprobs=logprobs, top_logprobs=top_logprobs, response_format=response_format,
            grammar=grammar))
        params = C.chat_params(self.tokenizer, self.config, body, self.chat_template,
                               C.compile_structure(body, self.tokenizer, self.config.vocab_size),
                               drop_turns=drop_turns)
        answer = C.Answer(True, self.name, self.tokenizer, len(params.prompt),
                          logprobs=params.logprobs is not None, dropped_messages=params.dropped_messages)
        return self._answer(answer, params, stream, include_usage)

    def _answer(self, answer, params, stream, include_usage):
        events = complete(self.model, params, self.tokenizer, speculator=self.speculator)
        if stream:
            return answer.stream(events, include_usage)
        return answer.collect(events)


__all__ = ["Llama", "Event"]
