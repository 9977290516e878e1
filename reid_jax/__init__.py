"""reid_jax: AGW person re-identification in JAX/Flax with explainable rankings."""

__version__ = "0.1.0"
