"""A random tiny Gemma (v1)-architecture model on the offline Wikipedia text with a byte
tokenizer: two (1 + w) norms per block, sqrt(d)-scaled embeddings, GeGLU MLPs, tied head. The
whole pipeline in seconds on a CPU (tests and smoke runs).

head_dim (24) is not hidden / heads (16), as on the released 7B model, so that readers which
derive it instead of reading it (GGUF attention.key_length) would show."""

from fips_jax.config_base import tiny_decoder_config


def get_config():
    return tiny_decoder_config(dict(
        model_type="gemma", vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=24, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"))
