"""The pre-0.2 import path of the generation engine, kept for one release: use `persllm_jax.serve.engine`."""

import warnings

from persllm_jax.serve.engine import Completion, Generator, SamplingParams

warnings.warn("persllm_jax.generate moved to persllm_jax.serve.engine", DeprecationWarning, stacklevel=2)

__all__ = ["Completion", "Generator", "SamplingParams"]
