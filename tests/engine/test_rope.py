"""llama2.rope's frequency tables against the reference that defines each scaling: transformers'
ROPE_INIT_FUNCTIONS (llama3, linear, dynamic). (Meta's llama-models apply_scaling is the same rule
but its module imports fairscale.)"""

import numpy as np
import pytest

from llama2 import rope
from llama2.config import ModelConfig, RopeScaling

torch = pytest.importorskip("torch", reason="the references are torch code")


def config(scaling=RopeScaling(), head_dim=128, theta=500000.0, seq_len=64):  # Llama 3.1 8B's heads
    return ModelConfig(dim=head_dim * 4, hidden_dim=8, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=8,
                       seq_len=seq_len, rope_theta=theta, rope_scaling=scaling).validate()


LLAMA31 = RopeScaling("llama3", factor=8.0, original_context=8192, low_freq_factor=1.0, high_freq_factor=4.0)


def test_llama31_divisors_cover_all_three_bands():
    """Llama 3.1 8B's heads see all of Meta's rule: kept, divided by 8, and interpolated between."""
    div = rope.divisors(config(LLAMA31))
    assert (div == 1).any() and (div == 8).any() and ((div > 1) & (div < 8)).any()


def hf_config(**rope_parameters):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=64,
                                    rope_parameters={"rope_theta": 500000.0, **rope_parameters})


def test_llama3_and_linear_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for kw, scaling in [
        (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192), LLAMA31),
        (dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192), RopeScaling("llama3", 32.0, 8192, 1.0, 4.0)),
        (dict(rope_type="linear", factor=4.0), RopeScaling("linear", 4.0)),
    ]:
        want, _ = ROPE_INIT_FUNCTIONS[kw["rope_type"]](hf_config(**kw), "cpu")
        np.testing.assert_allclose(rope.frequencies(config(scaling), 64)[0], want.numpy(), rtol=1e-6, atol=0)


def test_dynamic_position_p_uses_the_frequencies_for_p_plus_one_positions():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = hf_config(rope_type="dynamic", factor=4.0)
    c = config(RopeScaling("dynamic", 4.0, original_context=64), seq_len=256)
    table = rope.frequencies(c, c.seq_len)
    for p in (0, 63, 64, 100, 255):  # within the trained context the frequencies are unscaled
        want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=p + 1)
        np.testing.assert_allclose(table[p], want.numpy(), rtol=2e-6, atol=0)
    np.testing.assert_array_equal(table[63], rope.base_frequencies(128, c.rope_theta))


def test_tables_at_position_zero_are_the_identity_and_unscaled_is_run_c():
    for scaling in (RopeScaling(), LLAMA31, RopeScaling("linear", 2.0)):
        cos, sin = rope.tables(config(scaling))
        assert np.all(cos[0] == 1) and np.all(sin[0] == 0)
    cos, sin = rope.tables(config(theta=10000.0, head_dim=8, seq_len=4))
    freq = np.float32(1) / np.float32(10000.0) ** (np.arange(0, 8, 2, dtype=np.float32) / np.float32(8))
    np.testing.assert_allclose(cos, np.cos(np.arange(4, dtype=np.float32)[:, None] * freq), rtol=0, atol=1e-6)
