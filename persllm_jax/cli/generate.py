"""`persllm generate`: one prompt in, the completion on stdout (logs and progress go to stderr)."""

from __future__ import annotations

import sys

import click

from persllm_jax.io import DTYPE_NAMES, jnp_dtype


@click.command()
@click.option("--model", "model_spec", default="smollm2", show_default=True,
              help="HF directory (safetensors), Hub id ORG/NAME[@rev] (from the local cache), .gguf file, or 'smollm2' (embedded SmolLM2-135M-Instruct).")
@click.option("--prompt", required=True, help="The user message (or, with --raw, the exact text to continue).")
@click.option("--system", default=None, help="System message placed before the prompt in the chat template.")
@click.option("--raw", is_flag=True, help="Tokenize the prompt as is instead of applying the chat template.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0),
              help="0 means greedy decoding.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 disables top-k.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable); the completion ends before it.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True,
              help="Compute dtype.")
def generate(model_spec, prompt, system, raw, max_new_tokens, temperature, top_k, top_p, seed, stop, dtype):
    """Generate a completion for one prompt and print only the completion.

    \b
    Examples:
      persllm generate --prompt "Who wrote Hamlet?"
      persllm generate --model ./my-hf-model --system "You are Hermione Granger." --prompt "Hello!"
      persllm generate --raw --prompt "Once upon a time" --temperature 0.8 --seed 1
    """
    from persllm_jax.serve.engine import Generator, SamplingParams

    gen = Generator.load(model_spec, dtype=jnp_dtype(dtype))
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=tuple(stop))
    if raw:
        ids = gen.encode_raw(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = gen.encode_chat(messages)
    try:
        (completion,) = gen.generate_ids([ids], sampling)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    sys.stdout.write(completion.text.strip() + "\n" if not raw else completion.text + "\n")
