"""persllm-jax: PersLLM personified training in JAX."""

__version__ = "0.1.0"
