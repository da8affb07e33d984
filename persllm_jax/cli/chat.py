"""`persllm chat` (a terminal chat with a persona) and `persllm simulate` (personas talking in a scene)."""

from __future__ import annotations

import click

from persllm_jax.cli.serve import MODEL_HELP
from persllm_jax.io import DTYPE_NAMES


@click.command()
@click.option("--model", "model_spec", default=None, help=MODEL_HELP)
@click.option("--run", "run_dir", default=None, help="A training run directory: chat with its adapter.")
@click.option("--stage", default=None, help="Persona stage (id, or persona/stage) whose system prompt to use.")
@click.option("--persona", "persona_dir", default=None,
              help="A data_gen persona folder (persona.yaml): its stages' system prompts, without a run.")
@click.option("--system", default=None, help="A system prompt of your own (instead of the stage's).")
@click.option("--max-new-tokens", default=512, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 2.0),
              help="0 means greedy decoding.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--thoughts/--no-thoughts", default=False, show_default=True,
              help="Show the [Analysis] part of answers (toggle with /thoughts).")
@click.option("--chunk", default=4, show_default=True, type=click.IntRange(1, 512),
              help="Tokens decoded between screen updates.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
def chat(model_spec, run_dir, stage, persona_dir, system, max_new_tokens, temperature, top_p, seed, thoughts, chunk,
         dtype):
    """Chat with a persona in the terminal, answers streamed as they are generated.

    \b
    Commands: /reset (forget the conversation), /stage [ID] (list or switch stages),
              /thoughts (show or hide the [Analysis] part), /help, /quit (or Ctrl-D).
    Examples:
      persllm chat                                   # the embedded SmolLM2
      persllm chat --run runs/ada --stage early
    """
    from persllm_jax.io import jnp_dtype
    from persllm_jax.serve.chat import ChatSession, repl
    from persllm_jax.serve.engine import SamplingParams
    from persllm_jax.serve.personas import ModelPool, persona_stages

    pool = ModelPool(jnp_dtype(dtype), chunk=chunk)
    if run_dir:
        gen, stages = pool.run(run_dir, model_spec)
    else:
        gen, stages = pool.base(model_spec or "smollm2"), []
    if persona_dir:
        stages = persona_stages(persona_dir)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    session = ChatSession(gen, stages, sampling, system=system, show_thoughts=thoughts, chunk=chunk)
    if stage:
        session.set_stage(stage)
    elif stages and not system:
        session.set_stage(session.stage_names()[0])
    repl(session)


@click.command()
@click.option("--agent", "agents", multiple=True, required=True, metavar="NAME=MODEL_OR_RUN[:STAGE]",
              help="A participant (repeatable, at least two): a model spec or a run directory, optionally "
                   "with the persona stage whose system prompt it gets.")
@click.option("--scene", required=True, help="The scene: where they are and what they talk about.")
@click.option("--turns", default=6, show_default=True, type=click.IntRange(1), help="Turns in all.")
@click.option("--out", default=None, help="Transcript path: writes OUT.jsonl and OUT.md (default: print only).")
@click.option("--model", "model_spec", default=None,
              help="Base model for run agents (default: each run's own base).")
@click.option("--max-new-tokens", default=200, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0.0, 2.0))
@click.option("--top-p", default=0.9, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
def simulate(agents, scene, turns, out, model_spec, max_new_tokens, temperature, top_p, seed, dtype):
    """Several personas talk in a scene (the paper's multi-agent case study); agents take turns and each sees
    the conversation from its own side (its lines as the assistant, the others' as the user).

    \b
    Example:
      persllm simulate --agent Ada=runs/ada:late --agent Darwin=runs/darwin:late \\
          --scene "A dinner at Babbage's house in 1844; they discuss machines and nature." --turns 8 --out scene
    """
    from persllm_jax.io import jnp_dtype
    from persllm_jax.serve.engine import SamplingParams
    from persllm_jax.serve.personas import ModelPool
    from persllm_jax.serve.simulate import build_agents, run_scene, write_transcript

    if len(agents) < 2:
        raise click.BadParameter("a scene needs at least two agents", param_hint="--agent")
    built = build_agents(ModelPool(jnp_dtype(dtype)), agents, model_spec)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def show(turn):
        click.echo(f"{turn['agent']}: {turn['text']}\n")

    transcript = run_scene(built, scene, turns, sampling, on_turn=show)
    if out:
        jsonl, md = write_transcript(out, scene, built, transcript)
        click.echo(f"transcript: {jsonl} and {md}", err=True)
