"""The `persllm` command. Each subcommand lives beside the code it drives and is registered here."""

from __future__ import annotations

import click

from persllm_jax import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="persllm")
def main():
    """PersLLM in JAX: build persona corpora, train persona models (LoRA SFT, DPO), evaluate, chat, serve.

    MODEL arguments accept a Hugging Face directory (safetensors), a .gguf file, or `smollm2` for the
    embedded default SmolLM2-135M-Instruct.
    """
    _enable_compilation_cache()


def _enable_compilation_cache():
    """Keep compiled XLA programs across runs (PERSLLM_CACHE, default ~/.cache/persllm_jax; PERSLLM_XLA_CACHE=0 disables)."""
    import os

    if os.environ.get("PERSLLM_XLA_CACHE", "1") == "0":
        return
    import jax

    from persllm_jax.model.weights import cache_root

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _register():
    from persllm_jax.cli.generate import generate

    main.add_command(generate)
    from persllm_jax.cli.train import train

    main.add_command(train)
    from persllm_jax.cli.data import data

    main.add_command(data)
    from persllm_jax.cli.export import export

    main.add_command(export)
    from persllm_jax.cli.serve import chat, serve, simulate

    main.add_command(serve)
    main.add_command(chat)
    main.add_command(simulate)
    from persllm_jax.cli.eval import eval_cmd

    main.add_command(eval_cmd)
    from persllm_jax.train.plan import plan_command

    main.add_command(plan_command)
    from persllm_jax.pipeline.stages import reproduce_cmd

    main.add_command(reproduce_cmd)


_register()
