"""Which chat template a model uses: recognized from the Jinja template its files carry.

Hugging Face keeps it in tokenizer_config.json ("chat_template"), GGUF in tokenizer.chat_template.
We do not run Jinja: a template is recognized by its markers and rendered by chat.TEMPLATES.
"""

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
    """The template name a Jinja chat template corresponds to, or None when we do not know it."""
    if isinstance(text, list):  # tokenizer_config.json may hold [{"name":..., "template":...}]
        text = next((t.get("template") for t in text if t.get("name") == "default"), None)
    if not isinstance(text, str):
        return None
    for marker, name in _MARKERS:
        if marker in text:
            return name
    return None
