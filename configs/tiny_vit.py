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
    c.fips.update(budget=0.5, sparsity=0.75, group_size=2)
    c.local.update(epochs=10.0, batch_images=16, lr=3e-3, end_lr=3e-5, update_freq=5)
    c.checkpoint_every = 10
    c.eval.batch_size = 16
    return c
