"""The tokenizer corpus the byte-level tests run over (code, whitespace runs, digits, CJK, emoji,
invalid surrogates, special-token look-alikes), and where Meta's Llama 3 tokenizer.model is."""

from pathlib import Path

import pytest

CORPUS = [
    "Hello, world! How's it going? I'M SURE they'LL come, we'd've known.",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\r\n\t\tpass\n",
    "     leading, trailing      \n\n\n   \t\t  ",
    "Numbers 1234567 and 3.14159, 00042, 1,000,000 and x1y22z333",
    "日本語とEnglishの混在, 中文字符, 한국어 텍스트",
    "emoji 🍰🎉👩‍👩‍👧 and flags 🇫🇷 ok",
    "Émilie a mangé à 14h. Ünïcödé ßtraße",
    "bad surrogate \ud800 here and \udfff there",
    "<|eot_id|> typed by a user, <|begin_of_text|> too, <|im_end|> and <s></s> <unk>",
    "<|start_header_id|>user<|end_header_id|>",
    "",
    " ",
    "\n",
    "a" * 300 + " " + "9" * 40,
]


def clean(text):
    """What both sides encode: lone surrogates as U+FFFD (tiktoken's rule, ours too)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def meta_tokenizer_path() -> Path:
    llama_models = pytest.importorskip("llama_models")
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} not found (the llama-models package ships it)")
    return path
