"""A random tiny Gemma-3-architecture model on the offline Wikipedia text with a byte tokenizer:
q/k norms, 5 local : 1 global layers with their own RoPE bases, GeGLU MLPs, tied head. The whole
pipeline in seconds on a CPU (tests and smoke runs)."""

from fips_jax.config_base import tiny_decoder_config


def get_config():
    # 6 blocks: 0-4 local with a window (16) shorter than the 64-token contexts, 5 global.
    return tiny_decoder_config(dict(
        model_type="gemma3_text", vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=256, sliding_window=16, rope_theta=10000.0, rope_local_base_freq=1000.0,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True), group_size=3)
