"""Chat templates: the model's own Jinja template (tokenizer_config.json, chat_template.jinja, GGUF
tokenizer.chat_template) rendered as transformers' apply_chat_template renders it, and turned into
token ids with special tokens parsed in the template's text but never in the messages.

transformers' environment (utils/chat_template_utils.py): jinja2's ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, the loopcontrols extension and a `generation` block tag, a `tojson`
filter that keeps non-ASCII text, the globals raise_exception and strftime_now, and the variables
messages, tools, documents, add_generation_prompt, bos_token, eos_token. llama2.c files carry no
Jinja; theirs is run.c's Llama 2 template (chat.py) or ChatML, named by the version 3 header.
"""

import json
from datetime import datetime
from pathlib import Path

from .errors import FormatError, Llama2Error, UsageError
from .tokenizer import split_special

# name -> a canonical Jinja text, written into GGUF files so llama.cpp renders the same prompts
JINJA = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + "
        "'\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}

# marker -> template name, checked in this order
_MARKERS = (("<|im_start|>", "chatml"), ("[INST]", "llama2"))


def detect(text) -> str:
    """The built-in template a Jinja chat template spells like (by its markers), or None: what a
    llama2.c version 3 header can record of it."""
    if isinstance(text, list):  # tokenizer_config.json may hold [{"name":..., "template":...}]
        text = next((t.get("template") for t in text if t.get("name") == "default"), None)
    if not isinstance(text, str):
        return None
    for marker, name in _MARKERS:
        if marker in text:
            return name
    return None


class TemplateError(Llama2Error):
    """A chat template that raised (raise_exception, or a Jinja error) on these messages."""


# Private-use characters that stand for special-token texts inside messages while a template renders:
# what comes out of a message is text, whatever it spells.
_ESCAPE = 0xF0000


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} (transformers marks assistant text with it): the
        body, as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A Jinja chat template. `origin` names where it came from (the model's file) in every error;
    `bos_token` / `eos_token` are the texts tokenizer_config.json gives the template (None: the
    tokenizer's BOS and EOS)."""

    def __init__(self, source: str, origin: str, bos_token: str = None, eos_token: str = None):
        import jinja2
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise FormatError(f"{origin}: chat template does not parse ({_one_line(e)})") from None

    @property
    def name(self):
        """The built-in template this one is (see `detect`), or None."""
        return detect(self.source)

    def render(self, messages, add_generation_prompt: bool = True, bos_token: str = "",
               eos_token: str = "") -> str:
        """The prompt text, as transformers' apply_chat_template(messages, tokenize=False) gives it.
        `messages`: [{"role", "content"}] or (role, content) pairs; the template's own BOS / EOS
        texts win over `bos_token` / `eos_token`."""
        bos_token = self.bos_token if self.bos_token is not None else bos_token
        eos_token = self.eos_token if self.eos_token is not None else eos_token
        import jinja2
        msgs = [dict(m) if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
        try:
            return self._template.render(messages=msgs, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.origin}: chat template: {_one_line(e)}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"{self.origin}: chat template failed ({type(e).__name__}: "
                                f"{_one_line(e)})") from None

    def encode(self, tokenizer, messages, add_generation_prompt: bool = True) -> list:
        """Token ids of the rendered prompt: special tokens the template writes are their ids, any
        text a message holds is encoded as text (a user's "<|eot_id|>" stays characters)."""
        special = tokenizer.special
        texts = sorted(special, key=len, reverse=True)
        escape = {t: chr(_ESCAPE + i) for i, t in enumerate(texts)}
        unescape = {v: k for k, v in escape.items()}

        def hide(text):
            for t in texts:
                text = text.replace(t, escape[t])
            return text

        msgs = [dict(m) if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]
        for m in msgs:
            if isinstance(m.get("content"), str):
                m["content"] = hide(m["content"])
        ids = []
        text = self.render(msgs, add_generation_prompt, *token_texts(tokenizer))
        for part in split_special(text, special):
            if isinstance(part, int):
                ids.append(part)
            else:
                for ch, t in unescape.items():
                    part = part.replace(ch, t)
                ids.extend(tokenizer.encode(part, bos=False))
        return ids


def _one_line(e) -> str:
    return " ".join(str(e).split())


def token_texts(tokenizer) -> tuple:
    """The texts of the tokenizer's BOS and EOS, as templates spell them."""
    names = {i: t for t, i in tokenizer.special.items()}
    return tuple(names.get(i, tokenizer.decode([i])) for i in (tokenizer.bos_id, tokenizer.eos_id))


def resolve(template):
    """A ChatTemplate, or a built-in name as one."""
    return template if isinstance(template, ChatTemplate) else ChatTemplate(JINJA[template], f"built-in {template} template")


def from_model_files(text, origin: str, bos_token=None, eos_token=None):
    """The template a model file holds (a string, or tokenizer_config.json's list of named ones:
    "default"), as a ChatTemplate; None when there is none. `bos_token` / `eos_token` as
    tokenizer_config.json has them (a string, or {"content": ...})."""
    if isinstance(text, list):
        text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(text, str) or not text.strip():
        return None
    def content(token):
        return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None
    return ChatTemplate(text, origin, content(bos_token), content(eos_token))


def override(value: str, flag: str = "--chat-template"):
    """--chat-template's value: a built-in name, or a Jinja template file as a ChatTemplate."""
    if value in JINJA:
        return value
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{flag} {value!r}: expected {', '.join(JINJA)} or a Jinja template file")
    try:
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {value}: cannot read ({e})") from None
