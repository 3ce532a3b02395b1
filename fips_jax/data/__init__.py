"""Calibration and evaluation inputs as plain numpy arrays, by modality.

    text     text sources (offline Wikipedia, local files, HF datasets), tokenisation, windows
    images   ImageNet folders (sampled eagerly or streamed), Fashion-MNIST IDX files, resizing

Import from the submodule (`from fips_jax.data import images`). The names below are the ones
`pipeline.py` calls as `data.<name>`, re-exported for it.
"""

from fips_jax.data.images import fashion_mnist, grayscale_to_model_inputs, imagenet_folder_calibration
from fips_jax.data.text import encode, hf_text, local_text, token_windows, wiki_offline_text

__all__ = [
    "encode", "fashion_mnist", "grayscale_to_model_inputs", "hf_text", "imagenet_folder_calibration", "local_text",
    "token_windows", "wiki_offline_text",
]
