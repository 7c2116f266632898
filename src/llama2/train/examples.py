"""Finetuning examples: text, JSONL {"text"}, {"prompt", "completion"} or {"messages"} records turned
into token ids with a loss mask, packed into one stream and cut into --seq-len windows.

A record's tokens that are not trained on (a prompt, a chat's system and user turns, the template's
own markup) get the label IGNORE, which torch's cross_entropy skips. Packed windows may hold the end
of one example and the start of the next (attention crosses the boundary, as simple packing does).
"""

import json
import math
from pathlib import Path

import numpy as np

from .. import chat_template as templates
from ..errors import Llama2Error
from .stories import read_stories

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index
KINDS = ('{"text": ...}', '{"prompt": ..., "completion": ...}', '{"messages": [...]}')
ROLES = ("system", "user", "assistant")


class Example:
    """One record as token ids and which of them are trained on (targets of the loss)."""

    def __init__(self):
        self.ids, self.train = [], []

    def add(self, ids, trained: bool):
        self.ids.extend(ids)
        self.train.extend([trained] * len(ids))


def _text_example(tokenizer, text) -> Example:
    ex = Example()
    ex.add([tokenizer.bos_id], False)
    ex.add(tokenizer.encode(text, bos=False, eos=True), True)
    return ex


def _prompt_example(tokenizer, prompt, completion) -> Example:
    ex = Example()
    ex.add(tokenizer.encode(prompt, bos=True, eos=False), False)
    ex.add(tokenizer.encode(completion, bos=False, eos=True, prefix_space=False), True)
    return ex


def _chat_example(tokenizer, template, messages, where) -> Example:
    """The conversation as the model's chat template renders it; trained on the assistant turns:
    each turn's tokens are those the whole conversation up to it adds to the conversation before it
    with the generation prompt (so the template's own assistant header is not trained on)."""
    def render(turns, generation_prompt):  # -> ids; a template's refusal names the record too
        try:
            return template.encode(tokenizer, turns, add_generation_prompt=generation_prompt)
        except templates.TemplateError as e:  # its raise_exception (roles must alternate...) or a failure
            raise templates.TemplateError(f"{where}: {e}") from None

    full = render(messages, False)
    ex = Example()
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[:i + 1], False))
        if not done <= start <= end <= len(full):
            raise Llama2Error(f"{where}: the chat template does not render this conversation "
                              "turn by turn (a prefix of it is not a prefix of the whole)")
        ex.add(full[done:start], False)
        ex.add(full[start:end], True)
        done = end
    ex.add(full[done:], False)
    if full and full[0] != tokenizer.bos_id:  # templates that leave BOS to the tokenizer
        ex.ids.insert(0, tokenizer.bos_id)
        ex.train.insert(0, False)
    return ex


def _messages(value, where):
    if not isinstance(value, list) or not value:
        raise Llama2Error(f"{where}: \"messages\" must be a non-empty list of "
                          '{"role": ..., "content": ...} objects')
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise Llama2Error(f"{where}: messages[{k}] must be {{\"role\": one of {', '.join(ROLES)}, "
                              f"\"content\": a string}}, got {json.dumps(m)[:80]}")
    if not any(m["role"] == "assistant" for m in value):
        raise Llama2Error(f"{where}: the conversation has no assistant turn to train on")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _record(tokenizer, template, record, where) -> Example:
    if isinstance(record, dict):
        if "messages" in record:
            if template is None:
                raise Llama2Error(f"{where}: a chat record, but the base model has no chat template "
                                  "(pass --chat-template llama2, chatml or a Jinja file)")
            return _chat_example(tokenizer, template, _messages(record["messages"], where), where)
        if set(record) >= {"prompt", "completion"}:
            if isinstance(record["prompt"], str) and isinstance(record["completion"], str):
                return _prompt_example(tokenizer, record["prompt"], record["completion"])
        elif isinstance(record.get("text"), str):
            return _text_example(tokenizer, record["text"])
    raise Llama2Error(f"{where}: expected a JSON object {' or '.join(KINDS)} with string values, "
                      f"got {json.dumps(record)[:80]}")


def read_examples(path, tokenizer, template=None) -> list:
    """The examples of one file: .jsonl records (one JSON object a line), or stories of any other
    file as `llama2 data prepare` cuts them (plain text on <|endoftext|>, .json records' "text")."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        return [_text_example(tokenizer, story) for story in read_stories(path)]
    template = templates.resolve(template) if template is not None else None
    out = []
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise Llama2Error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Llama2Error(f"{path}: is a directory, expected a .jsonl file") from None
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise Llama2Error(f"{where}: invalid UTF-8") from None
        except json.JSONDecodeError as e:
            raise Llama2Error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        out.append(_record(tokenizer, template, record, where))
    if not out:
        raise Llama2Error(f"{path}: no records")
    return out


def split(examples, fraction):
    """(train, val): every record k with floor((k+1)f) > floor(kf) to val (data prepare's rule)."""
    train, val = [], []
    for k, ex in enumerate(examples):
        (val if math.floor((k + 1) * fraction) > math.floor(k * fraction) else train).append(ex)
    return train, val


class Packed:
    """Examples packed into one stream, cut into windows of seq_len + 1 tokens that overlap by one
    (the last token of a window is the first input of the next); batches sample windows."""

    def __init__(self, examples, seq_len, pad_id, name):
        if not examples:
            raise Llama2Error(f"{name}: no examples")
        ids = np.fromiter((i for ex in examples for i in ex.ids), np.int64)
        trained = np.fromiter((t for ex in examples for t in ex.train), bool)
        if not trained.any():
            raise Llama2Error(f"{name}: no tokens to train on")
        self.windows = max(1, -(-(len(ids) - 1) // seq_len))
        total = self.windows * seq_len + 1
        self.ids = np.full(total, pad_id, np.int64)
        self.labels = np.full(total, IGNORE, np.int64)
        self.ids[:len(ids)] = ids
        self.labels[:len(ids)] = np.where(trained, ids, IGNORE)
        self.seq_len, self.tokens = seq_len, int(trained.sum())

    def sample(self, batch_size, seed, purpose, iteration, micro):  # -> x, y: int64 [B, T]
        """Windows chosen by (seed, purpose, iteration, micro) alone, as data.Batches chooses."""
        rng = np.random.default_rng([seed, purpose, iteration, micro])
        starts = rng.integers(0, self.windows, size=batch_size) * self.seq_len
        x = np.stack([self.ids[s:s + self.seq_len] for s in starts])
        y = np.stack([self.labels[s + 1:s + 1 + self.seq_len] for s in starts])
        return x, y
