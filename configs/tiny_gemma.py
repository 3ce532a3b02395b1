"""A random tiny Gemma (v1)-architecture model on the offline Wikipedia text with a byte
tokenizer: two (1 + w) norms per block, sqrt(d)-scaled embeddings, GeGLU MLPs, tied head. The
whole pipeline in seconds on a CPU (tests and smoke runs).

head_dim (24) is not hidden / heads (16), as on the released 7B model, so that readers which
derive it instead of reading it (GGUF attention.key_length) would show."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "random"
    c.model.tokenizer = "bytes"
    c.model.hf_config = dict(
        model_type="gemma", vocab_size=256, hidden_size=32, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=24, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh")
    c.data.calib.update(source="wiki_offline", split="calib", window=64, n_windows=8)
    c.data.eval.update(source="wiki_offline", split="eval", context=64, max_windows=8)
    c.data.holdout_windows = 4
    c.fips.budget = 0.5
    c.fips.sparsity = 0.75
    c.fips.group_size = 2
    c.local.epochs = 10.0
    c.local.batch_tokens = 128
    c.local.lr = 3e-3
    c.local.end_lr = 3e-5
    c.local.weight_decay = 0.0
    c.local.update_freq = 5
    c.checkpoint_every = 10
    return c
