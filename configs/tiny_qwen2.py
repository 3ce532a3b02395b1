"""A random tiny Qwen2-architecture model (q/k/v biases, tied embeddings as in the small Qwen2.5
sizes) on the offline Wikipedia text with a byte tokenizer: the whole pipeline in seconds on a CPU."""

from fips_jax.config_base import tiny_decoder_config


def get_config():
    return tiny_decoder_config(dict(
        model_type="qwen2", vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False))
