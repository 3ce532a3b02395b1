"""A random tiny Llama-architecture model on the offline Wikipedia text with a byte tokenizer:
the whole pipeline in seconds on a CPU (tests and smoke runs)."""

from fips_jax.config_base import tiny_decoder_config


def get_config():
    return tiny_decoder_config(dict(
        model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu"))
