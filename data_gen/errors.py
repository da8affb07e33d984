"""The one error type data_gen raises for bad input: a `PersllmError`, so the CLI prints it as one line."""

from persllm_jax.errors import PersllmError


class DataGenError(PersllmError):
    """A problem with the user's input (persona folder, config, templates, general data), worded for a person."""
