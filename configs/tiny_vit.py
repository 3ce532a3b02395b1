"""A random tiny ViT on random images: the ViT path of the pipeline in seconds on a CPU."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "random"
    c.model.hf_config = dict(
        model_type="vit", image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, hidden_act="gelu", layer_norm_eps=1e-12, num_labels=10,
        qkv_bias=True)
    c.data.calib.update(source="random", n_images=64)
    c.data.eval.update(source="random", n_images=32)
    c.data.holdout_images = 16
    c.fips.budget = 0.5
    c.fips.sparsity = 0.75
    c.fips.group_size = 2
    c.local.epochs = 10.0
    c.local.batch_images = 16
    c.local.lr = 3e-3
    c.local.end_lr = 3e-5
    c.local.update_freq = 5
    c.checkpoint_every = 10
    c.eval.batch_size = 16
    return c
