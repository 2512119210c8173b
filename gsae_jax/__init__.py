"""gsae_jax: Gated Sparse Autoencoders (arXiv 2404.16014) in JAX / Flax NNX."""

__version__ = "0.1.0"
