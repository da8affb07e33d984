"""The `persllm` command: one module per command group, and the only package that imports click.

Every command is a thin layer over the library: it parses options, calls one library function and prints.
Errors worded for the user (`persllm_jax.errors.PersllmError` and its subclasses) are caught once, here, and
printed as one line (`Error: ...`, exit 1); anything else is a bug and keeps its traceback.
May import anything in persllm_jax and data_gen.
"""

from __future__ import annotations

import click

from persllm_jax import __version__
from persllm_jax.errors import PersllmError


class PersllmGroup(click.Group):
    """A click group that turns a PersllmError raised by any subcommand into click's one-line error."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PersllmError as e:
            msg = str(e).strip() or type(e).__name__
            raise click.ClickException(msg) from None


@click.group(cls=PersllmGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="persllm")
def main():
    """PersLLM in JAX: build persona corpora, train persona models (LoRA SFT, DPO), evaluate, chat, serve.

    MODEL arguments accept a Hugging Face directory (safetensors), a .gguf file, `smollm2` for the
    embedded default SmolLM2-135M-Instruct, or a Hub id ORG/NAME[@REVISION] already in the local Hugging
    Face cache (`hf download ORG/NAME`; HF_HUB_CACHE / HF_HOME honoured). Commands that take a --config also take --set KEY=VALUE and
    --print-config (every key with its resolved value).
    """
    _enable_compilation_cache()


def _enable_compilation_cache():
    """Keep compiled XLA programs across runs (PERSLLM_CACHE, default ~/.cache/persllm_jax; PERSLLM_XLA_CACHE=0 disables)."""
    import os

    if os.environ.get("PERSLLM_XLA_CACHE", "1") == "0":
        return
    import jax

    from persllm_jax.io import cache_root

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _register():
    from persllm_jax.cli.chat import chat, simulate
    from persllm_jax.cli.data import data
    from persllm_jax.cli.eval import eval_cmd
    from persllm_jax.cli.export import export
    from persllm_jax.cli.generate import generate
    from persllm_jax.cli.plan import plan_command
    from persllm_jax.cli.plot import plot_cmd
    from persllm_jax.cli.reproduce import reproduce_cmd
    from persllm_jax.cli.serve import serve
    from persllm_jax.cli.train import train

    for command in (generate, data, train, export, serve, chat, simulate, eval_cmd, plan_command, plot_cmd,
                    reproduce_cmd):
        main.add_command(command)


_register()
