"""Fill in the middle (Code Llama): the prompt its tokenizer builds from a prefix and a suffix, and
the token that ends the middle.

Layout (Meta's codellama generation.py `_infilling_prompt_tokens`, transformers'
CodeLlamaTokenizer with `suffix=`): BOS ▁<PRE> prefix ▁<SUF> suffix ▁<MID>, the prefix encoded as
any text (sentencepiece's dummy-prefix space) and the suffix without that space; the model writes
the middle and ends it with ▁<EOT>. Only vocabularies that have the four tokens can infill.
"""

from dataclasses import dataclass

# The pieces as Code Llama's sentencepiece model spells them ("▁" is a space in tokenizer.bin)
PIECES = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "end": "▁<EOT>"}


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    suffix: int
    middle: int
    end: int


def fim_tokens(tokenizer) -> "FimTokens | None":
    """The ids of a vocabulary's fill-in-the-middle tokens, or None when it lacks any of them."""
    ids = {}
    for i, piece in enumerate(tokenizer.pieces):
        ids.setdefault(piece, i)
    found = {}
    for name, piece in PIECES.items():
        spelled = piece.replace("▁", " ").encode("utf-8")
        tid = ids.get(spelled, ids.get(spelled.lstrip()))  # some exports drop the leading space
        if tid is None:
            return None
        found[name] = tid
    return FimTokens(**found)


def missing_message(model: str) -> str:
    return (f"{model} has no fill-in-the-middle tokens ({', '.join(PIECES.values())}): infilling "
            "needs a model trained for it, such as Code Llama")


def prompt(tokenizer, fim: FimTokens, prefix: str, suffix: str) -> list:
    """Token ids of the infilling prompt (BOS first); the middle is generated after them."""
    return ([tokenizer.bos_id, fim.prefix] + tokenizer.encode(prefix, bos=False)
            + [fim.suffix] + tokenizer.encode(suffix, bos=False, prefix_space=False) + [fim.middle])
