"""A random tiny Qwen3-architecture model (per-head q/k RMSNorm, explicit head_dim 16 != 32 / 4
heads, untied head) on the offline Wikipedia text with a byte tokenizer: the whole pipeline in
seconds on a CPU."""

from fips_jax.config_base import tiny_decoder_config


def get_config():
    return tiny_decoder_config(dict(
        model_type="qwen3", vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, hidden_act="silu",
        attention_bias=False, use_sliding_window=False))
