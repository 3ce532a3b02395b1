"""fips_jax: Fine-grained Parameter Sharing (FiPS) compression for JAX/Flax transformers."""

__version__ = "0.1.0"
