"""DeiT-B (12 blocks, d 768, p 3072): 3 groups of 4, 75% sparsity, GMP; calibration 20 x 128
class-stratified ImageNet train images, AdamW lr 1e-3 wd 0.05 cosine to 1e-5, 20 epochs; top-1
on the 50k val images (resize 256, center crop 224) (SPEC §4, §6, §7). Point data.*.path at an
ImageNet folder (`<root>/{train,val}/<wnid>/*.JPEG`)."""

from fips_jax.config_base import base_config


def get_config():
    c = base_config()
    c.model.source = "hf"
    c.model.path = "facebook/deit-base-patch16-224"
    c.data.calib.update(source="imagenet_folder", path="", split="train", per_class=3, n_classes=0,
                        interpolation="bilinear")
    c.data.eval.update(source="imagenet_folder", path="", split="val", per_class=50, n_classes=0,
                       interpolation="bilinear")
    c.data.holdout_images = 256
    c.fips.update(budget=0.5, sparsity=0.75, group_size=4)
    c.local.update(epochs=20.0, batch_images=128, lr=1e-3, end_lr=1e-5, weight_decay=0.05)
    c.eval.batch_size = 256
    return c
