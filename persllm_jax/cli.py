"""The `persllm` command. Each subcommand lives beside the code it drives and is registered here."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="persllm")
def main():
    """PersLLM in JAX: build persona corpora, train persona models (LoRA SFT, DPO), evaluate, chat, serve.

    MODEL arguments accept a Hugging Face directory (safetensors), a .gguf file, or `smollm2` for the
    embedded default SmolLM2-135M-Instruct.
    """


def _register():
    from .generate_cli import generate

    main.add_command(generate)
    from .train_cli import train

    main.add_command(train)
    from data_gen.cli import data

    main.add_command(data)


_register()
