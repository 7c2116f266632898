"""Multi-turn chat over one KV cache: the model's own Jinja template (chat_template.ChatTemplate),
or for llama2.c files the Llama 2 chat template as run.c renders it (or ChatML).

run.c's way: each turn is rendered, encoded with BOS and appended to the conversation already in the
cache; the assistant's turn ends at EOS, which is fed back before the next turn. A Jinja template
renders the whole conversation each turn; the cache keeps the tokens it shares with the last one.
Running out of positions ends the conversation with finish reason "length".
"""

import re

from .chat_template import ChatTemplate

from .generate import Event, Params, Sequence, resolve_steps
from .sampler import Sampler


def render_llama2(user: str, system: str = "") -> str:
    """run.c's templates: the system prompt only on the first turn, and only when non-empty."""
    if system:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    return f"[INST] {user} [/INST]"


def render_chatml(user: str, system: str = "") -> str:
    """ChatML (TinyLlama-chat style models): one block per message, then the assistant's header."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


TEMPLATES = {"llama2": render_llama2, "chatml": render_chatml}
# Markers a template uses that models keep as single special tokens (Hugging Face "added tokens"):
# when the vocabulary has one as a whole piece it is fed as that id, not spelled out by BPE. The
# last marker of a template also ends the assistant's turn, as EOS does.
MARKERS = {"llama2": (), "chatml": ("<|im_start|>", "<|im_end|>")}


def marker_ids(tokenizer, template) -> dict:
    """marker text -> id, for the template's markers that are single pieces of this vocabulary."""
    pieces = {p: i for i, p in enumerate(tokenizer.pieces)}
    return {m: pieces[m.encode()] for m in MARKERS[template] if m.encode() in pieces}


def encode_turn(tokenizer, text, markers: dict) -> list:
    """BOS, then `text` encoded as run.c does, except that each marker in `markers` is its id."""
    if not markers:
        return tokenizer.encode(text, bos=True)
    tokens = [tokenizer.bos_id]
    for part in re.split("(" + "|".join(map(re.escape, markers)) + ")", text):
        if part in markers:
            tokens.append(markers[part])
        elif part:
            tokens.extend(tokenizer.encode(part, bos=False))
    return tokens

ROLES = ("system", "user", "assistant")


def encode_dialog(tokenizer, messages, template="llama2", add_generation_prompt: bool = True) -> list:
    """Token ids of a whole conversation, ending where the assistant's next reply begins (or, with
    add_generation_prompt=False, where the next user message begins: the tokens a chat's next
    turn starts with).

    `messages` is a list of (role, content) pairs: an optional system message first, then user and
    assistant messages alternating, ending with a user message (with add_generation_prompt=False:
    an assistant message; ValueError otherwise, naming the index). Llama 2 (Meta's
    chat_completion): each finished exchange is encoded on its own as
    `<s>[INST] {user} [/INST] {assistant} </s>` (BOS and EOS ids, the reply stripped, as Meta does),
    the system prompt folded into the first user message, and the last user message as run.c
    renders a turn: a one-turn dialog gives exactly the tokens of run.c's chat mode. ChatML renders
    every message in one block, encoded as ChatSession encodes a turn (BOS, markers as their ids).
    A ChatTemplate (the model's own) renders the messages as they are, and says what it refuses.
    """
    if isinstance(template, ChatTemplate):
        return template.encode(tokenizer, messages, add_generation_prompt)
    messages = list(messages)
    system = ""
    if messages and messages[0][0] == "system":
        system = messages.pop(0)[1]
        offset = 1
    else:
        offset = 0
    if not messages:
        raise ValueError(f"messages[{offset}]: expected a user message")
    for i, (role, _) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"messages[{i + offset}]: expected role {expected!r}, got {role!r}"
                             " (an optional system message first, then user and assistant alternate)")
    if len(messages) % 2 != add_generation_prompt:
        last = "user" if add_generation_prompt else "assistant"
        raise ValueError(f"messages[{len(messages) + offset - 1}]: the last message must be from the {last}")
    if template == "chatml":
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for role, content in messages:
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        return encode_turn(tokenizer, text, marker_ids(tokenizer, template))
    if template != "llama2":
        raise ValueError(f"unknown chat template {template!r}")
    tokens = []
    for k in range(0, len(messages) - 1, 2):
        turn = render_llama2(messages[k][1], system if k == 0 else "")
        tokens += tokenizer.encode(f"{turn} {messages[k + 1][1].strip()} ", bos=True, eos=True)
    if not add_generation_prompt:
        return tokens
    return tokens + tokenizer.encode(render_llama2(messages[-1][1], system if len(messages) == 1 else ""),
                                     bos=True)


def reply_end_ids(tokenizer, template, eos_id: int) -> frozenset:
    """Token ids that end the assistant's reply: EOS and every end token the model declares
    (tokenizer.end_ids: eos_token_id lists, <|eot_id|> and its kind, BOS for llama2.c vocabularies
    as run.c stops there), and a built-in template's closing marker when the vocabulary has it as
    one piece."""
    ends = {eos_id} | set(tokenizer.end_ids)
    if isinstance(template, ChatTemplate):
        return frozenset(ends)
    markers = marker_ids(tokenizer, template)
    return frozenset(ends | {markers[m] for m in MARKERS[template][-1:] if m in markers})


class ChatSession:
    """A conversation: `turn(user, system)` yields the assistant's Events for one user message.
    With `grammar` (a structured.Grammar) every reply matches it."""

    def __init__(self, llama, sampler: Sampler, steps: int = 0, template="llama2", grammar=None):
        self.llama = llama
        self.model = llama.model
        self.tokenizer = llama.tokenizer
        self.sampler = sampler
        self.grammar = grammar
        self.steps = resolve_steps(steps, self.model.config.seq_len)
        self.template = template
        if not isinstance(template, ChatTemplate):
            self.render = TEMPLATES[template]
            self.markers = marker_ids(self.tokenizer, template)
        self.stop_ids = reply_end_ids(self.tokenizer, template, self.model.config.eos_id)
        self.cache = self.model.new_cache()
        self.pos = 0  # positions run so far
        self._pending = []  # the EOS that closed the last reply, fed with the next turn
        self.messages = []  # a Jinja template's conversation so far, as (role, content)
        self.fed = []  # a Jinja template's tokens in the cache
        self.speculator = getattr(llama, "speculator", None)  # speculative decoding, if the Llama has it
        self.history = []  # with a speculator: the tokens in the cache (its draft follows them)

    def _drafting(self, params, context):
        """The turn's speculative.Drafting (None without a speculator): `context` is every token of
        the conversation up to the reply, so a draft model and prompt lookup see all of it."""
        if self.speculator is None:
            return None
        return self.speculator.start(params, 0, context=list(context))

    def _step(self, seq, drafting) -> list:
        """A step after the turn's prompt pass: one token, or a drafted and verified run of them."""
        if drafting is None:
            events = seq.advance(self.model.forward(seq.feed, self.cache)[-1])
        else:
            events = drafting.step(self.model, self.cache, seq)
            self.history = drafting.context[:int(self.cache.pos[0])]
        self.pos = int(self.cache.pos[0])
        return events

    def turn(self, user: str, system: str = ""):
        if isinstance(self.template, ChatTemplate):
            yield from self._render_turn(user, system)
            return
        cfg = self.model.config
        text = self.render(user, system if self.pos == 0 and not self._pending else "")
        tokens = self._pending + encode_turn(self.tokenizer, text, self.markers)
        if self.pos + len(tokens) > self.steps:
            yield Event(None, b"", "", finish_reason="length")
            return
        self._pending = []
        # run.c samples after every position, prompt included: keep its coins in step.
        if self.sampler.temperature != 0:
            for _ in range(len(tokens) - 1):
                self.sampler.rng.f32()
        s = self.sampler
        self.pos += len(tokens)
        # positions self.pos .. steps may each sample a token, as run.c's loop does
        params = Params(tuple(tokens), max_tokens=self.steps - self.pos + 1, temperature=s.temperature,
                        top_p=s.top_p, seed=s.seed, stop_tokens=frozenset(self.stop_ids), grammar=self.grammar)
        seq = Sequence(params, self.tokenizer, sampler=s)
        drafting = self._drafting(params, self.history + tokens)
        logits = self.model.forward(tokens, self.cache)[-1]
        events = seq.advance(logits) if drafting is None else drafting.plain(seq, logits)
        if drafting is not None:
            self.history = drafting.context[:self.pos]
        while True:
            yield from events
            if events[-1].finish_reason == "stop":  # the reply's end is fed with the next turn
                # a reply that ends at BOS is closed with EOS: the next turn brings its own BOS
                end = seq.stop_token
                self._pending = [end if end not in (None, self.tokenizer.bos_id) else cfg.eos_id]
            if events[-1].finish_reason is not None:
                return
            events = self._step(seq, drafting)

    def _render_turn(self, user: str, system: str):
        """One turn with a Jinja template: the whole conversation rendered and encoded; the cache
        keeps the positions it shares with what was fed before (a reply re-encoded from its text
        may differ from the tokens sampled), the rest is computed."""
        messages = list(self.messages)
        if not messages and system:
            messages.append(("system", system))
        messages.append(("user", user))
        ids = self.template.encode(self.tokenizer, messages)
        if len(ids) > self.steps:
            yield Event(None, b"", "", finish_reason="length")
            return
        keep = 0
        while keep < min(len(ids) - 1, len(self.fed)) and ids[keep] == self.fed[keep]:
            keep += 1
        self.cache.pos[0] = keep  # positions past `keep` are written again
        tokens = ids[keep:]
        s = self.sampler
        params = Params(tuple(tokens), max_tokens=self.steps - len(ids) + 1, temperature=s.temperature,
                        top_p=s.top_p, seed=s.seed, stop_tokens=self.stop_ids, grammar=self.grammar)
        seq = Sequence(params, self.tokenizer, sampler=s)
        self.fed, self.pos = ids, len(ids)
        reply = []
        drafting = self._drafting(params, ids)
        logits = self.model.forward(tokens, self.cache)[-1]
        events = seq.advance(logits) if drafting is None else drafting.plain(seq, logits)
        try:
            while True:
                for event in events:
                    reply.append(event.text)
                    yield event
                if events[-1].finish_reason is not None:
                    return
                feed = seq.feed
                events = self._step(seq, drafting)
                self.fed = self.fed + feed if drafting is None else self.history
        finally:  # also when the caller stops reading: the reply so far is the assistant's turn
            self.messages = messages + [("assistant", "".join(reply))]
            seq.close()
