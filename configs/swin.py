"""Swin-L (blocks 2/2/18/2, d 192..1536): each 2-block stage is a group, the 18-block stage is
3 groups of 6 (SPEC §1); otherwise as configs/deit.py."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "hf"
    c.model.path = "microsoft/swin-large-patch4-window7-224"
    c.data.calib.update(source="imagenet_folder", path="", split="train", per_class=3, n_classes=0)
    c.data.eval.update(source="imagenet_folder", path="", split="val", per_class=50, n_classes=0)
    c.data.holdout_images = 256
    c.fips.groups = ((0, 1), (2, 3), (4, 5, 6, 7, 8, 9), (10, 11, 12, 13, 14, 15), (16, 17, 18, 19, 20, 21),
                     (22, 23))
    c.local.update(epochs=20.0, batch_images=128, lr=1e-3, end_lr=1e-5)
    c.eval.batch_size = 256
    return c
