"""Model and generation configuration: every default lives here, in exactly one place.

A ModelConfig is built from a checkpoint's header (or a config.json), never from a file name.
"""

from dataclasses import dataclass, field

from .errors import FormatError


ROPE_STYLES = ("interleaved", "halves")
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "factors")


@dataclass(frozen=True)
class RopeScaling:
    """How a model stretches RoPE past the context it was trained on (llama2.rope computes the
    tables). "linear": positions divided by `factor`; "dynamic": NTK-aware, the base grows with the
    position past `original_context` (transformers' dynamic_ntk); "llama3": Meta's per-frequency
    rule (`factor`, `low_freq_factor`, `high_freq_factor`, `original_context`); "factors": each
    frequency divided by its entry of `freq_factors`, as GGUF's rope_freqs tensor gives them."""
    kind: str = "none"
    factor: float = 1.0
    original_context: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    freq_factors: tuple = ()


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bos_id: int = 1
    eos_id: int = 2
    # How q and k weights order each head's RoPE pairs: "interleaved" (Meta, llama2.c, GGUF: x0 y0 x1
    # y1 ...) or "halves" (Hugging Face: all x first, then all y; the rotate-half form). A property
    # of the weights as stored, so HF folders run in place without un-permuting a copy.
    rope_style: str = "interleaved"
    rope_scaling: RopeScaling = RopeScaling()
    # Set where a model's heads are not dim / n_heads wide (Mistral Nemo, some Llama 3 exports);
    # None: dim // n_heads.
    explicit_head_dim: int = None
    # Attention over the last `sliding_window` positions only (Mistral 7B v0.1); None: all.
    sliding_window: int = None

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:  # the width of q and of the attention output: n_heads * head_dim
        return self.head_dim * self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def validate(self, source="checkpoint"):
        """Reject non-positive or inconsistent dimensions with one line naming the field."""
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise FormatError(f"{source}: {name} must be a positive integer, got {value}")
        if self.explicit_head_dim is None and self.dim % self.n_heads:
            raise FormatError(f"{source}: dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(
                f"{source}: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise FormatError(f"{source}: head size {self.head_dim} must be even for RoPE")
        if self.rope_style not in ROPE_STYLES:
            raise FormatError(f"{source}: rope_style {self.rope_style!r} is not one of {', '.join(ROPE_STYLES)}")
        if not self.rope_theta > 0:
            raise FormatError(f"{source}: rope_theta must be positive, got {self.rope_theta}")
        rs = self.rope_scaling
        if rs.kind not in ROPE_SCALINGS:
            raise FormatError(f"{source}: RoPE scaling {rs.kind!r} is not one of {', '.join(ROPE_SCALINGS)}")
        if rs.kind != "none" and not rs.factor > 0:
            raise FormatError(f"{source}: RoPE scaling factor must be positive, got {rs.factor}")
        if rs.kind in ("dynamic", "llama3") and rs.original_context <= 0:
            raise FormatError(f"{source}: RoPE scaling {rs.kind!r} needs original_max_position_embeddings")
        if rs.kind == "factors" and len(rs.freq_factors) != self.head_dim // 2:
            raise FormatError(f"{source}: RoPE frequency factors hold {len(rs.freq_factors)} values; "
                              f"expected head size / 2 = {self.head_dim // 2}")
        for name in ("explicit_head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise FormatError(f"{source}: {name} must be a positive integer, got {value}")
        return self


# Named presets: the published llama2.c / Llama 2 shapes. Used by the benchmark and by training.
PRESETS = {
    "stories260K": ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4,
                               vocab_size=512, seq_len=512),
    "stories15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                              vocab_size=32000, seq_len=256),
    "stories42M": ModelConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8,
                              vocab_size=32000, seq_len=1024),
    "stories110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12,
                               vocab_size=32000, seq_len=1024),
    "llama2-7b": ModelConfig(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                             vocab_size=32000, seq_len=4096),
}


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and CLI defaults, as llama2.c's run.c has them."""
    temperature: float = 1.0
    top_p: float = 0.9
    steps: int = 256
    seed: int = 0  # 0 or negative: seed from the clock, as run.c
    mode: str = "generate"


Q8_GROUP_SIZE = 32  # --quantize q8_0 at load: values per scale, as llama.cpp's Q8_0
# The most rows one native pass holds: a longer prompt runs as several passes (the same bits: a row's
# logits do not depend on its pass), so its activations stay this many rows whatever the context
# (a 128k-token model's whole-context pass would need tens of GB).
PASS_ROWS = 512
DEFAULT_MODEL = "stories15M.bin"
DEFAULT_TOKENIZER = "tokenizer.bin"
DEFAULT_PROMPT = "Once upon a time"
GENERATION = GenerationConfig()
