"""A random tiny Gemma-2-architecture model on the offline Wikipedia text with a byte tokenizer:
the whole pipeline in seconds on a CPU (tests and smoke runs).

head_dim = query_pre_attn_scalar = 256 and the soft-caps at Gemma-2's own 50 / 30, as in the
released 2B and 9B models: llama.cpp scales queries by head_dim ** -0.5 and transformers' GGUF
loader reads neither field, so this is the tiny model whose GGUF export runs the same everywhere.
A 16-token window shorter than the 64-token context, so local and global layers differ."""

from fips_jax.config_base import tiny_decoder_config


def get_config():
    return tiny_decoder_config(dict(
        model_type="gemma2", vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh"))
