"""`persllm serve`, `persllm chat`, `persllm simulate`: talk to the personas."""

from __future__ import annotations

import os
import sys

import click

DTYPES = ("float32", "bfloat16")
MODEL_HELP = "Base model: HF directory, .gguf file, or 'smollm2' (default: the run's own base model, else smollm2)."


def _dtype(name: str):
    import jax.numpy as jnp

    return getattr(jnp, name)


def _fail(e: Exception):
    raise click.ClickException(str(e)) from None


def _parse_adapter(text: str) -> tuple[str, str, str | None]:
    from persllm_jax.serve.personas import split_model_stage

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise click.BadParameter(f"{text!r}: expected NAME=RUN_DIR or NAME=RUN_DIR:STAGE", param_hint="--adapter")
    path, stage = split_model_stage(rest)
    return name, path, stage


@click.command()
@click.option("--model", "model_spec", default=None, help=MODEL_HELP)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=RUN_DIR[:STAGE]",
              help="A trained run served as model NAME (repeatable). With :STAGE, requests without a system "
                   "message get that persona stage's system prompt.")
@click.option("--base-name", default="base", show_default=True,
              help="Model name of the base model without adapter ('' to serve only the adapters).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--api-key", default=lambda: os.environ.get("PERSLLM_API_KEY") or None,
              help="Require 'Authorization: Bearer KEY' (default: $PERSLLM_API_KEY).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="Most concurrent requests decoded in one batch (1 = one at a time).")
@click.option("--chunk", default=16, show_default=True, type=click.IntRange(1, 512),
              help="Tokens decoded per device call between stream updates.")
@click.option("--default-max-tokens", default=512, show_default=True, type=click.IntRange(1),
              help="Completion limit for requests without max_tokens.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--rate-prompts", default=None, metavar="FILE_OR_CORPUS_DIR",
              help="Prompts for the /rate page: a corpus dir (its sft/test.jsonl) or a JSONL of prompts.")
@click.option("--rate-db", default=None, metavar="FILE",
              help="SQLite database of /rate judgements (default with --rate-prompts: ./ratings.sqlite).")
@click.option("--rate-models", default=None, metavar="NAME,NAME,...",
              help="Models compared on /rate (default: all served).")
@click.option("--rate-max-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="Answer length on /rate.")
def serve(model_spec, adapters, base_name, host, port, api_key, max_batch, chunk, default_max_tokens, dtype,
          rate_prompts, rate_db, rate_models, rate_max_tokens):
    """Serve personas over an OpenAI-compatible API (/v1/models, /v1/chat/completions, SSE streaming).

    \b
    Examples:
      persllm serve --model smollm2
      persllm serve --adapter ada=runs/ada:early --adapter darwin=runs/darwin:late --api-key secret
    Then e.g. OPENAI_BASE_URL=http://127.0.0.1:8000/v1 with any OpenAI client, model "ada".
    Web pages on the same port: / (chat) and /rate (blind pairwise rating; needs --rate-prompts), see docs/web.md.
    """
    from persllm_jax.serve.app import Persona, ServerState, bind, build_app, run_server
    from persllm_jax.serve.personas import ModelPool, TalkError, find_stage, read_run

    parsed = [_parse_adapter(a) for a in adapters]
    names = [p[0] for p in parsed] + ([base_name] if base_name else [])
    if len(set(names)) != len(names):
        raise click.BadParameter("model names must be unique (adapters and --base-name)", param_hint="--adapter")
    if not parsed and not base_name:
        raise click.UsageError("nothing to serve: give --adapter or a --base-name")
    pool = ModelPool(_dtype(dtype), chunk=chunk)
    personas, stage_lists = {}, {}
    try:
        base_spec = model_spec or (read_run(parsed[0][1]).get("model") if parsed else None) or "smollm2"
        base = pool.base(base_spec)
        for name, run_dir, stage in parsed:
            gen, stages = pool.run(run_dir, base_spec)
            stage_lists[name] = stages
            system = find_stage(stages, stage).system if stage else None
            personas[name] = Persona(name, gen, system, f"{run_dir}" + (f":{stage}" if stage else ""))
        if base_name:
            personas[base_name] = Persona(base_name, base, None, base_spec)
    except TalkError as e:
        _fail(e)
    state = ServerState(personas, api_key=api_key, max_batch=max_batch, chunk=chunk,
                        default_max_tokens=default_max_tokens)
    from persllm_jax.serve.web import RateConfig, RateError, web_routes

    if (rate_db or rate_models) and not rate_prompts:
        raise click.UsageError("--rate-db and --rate-models need --rate-prompts")
    rate = None
    if rate_prompts:
        rate = RateConfig(rate_prompts, rate_db or "ratings.sqlite",
                          tuple(m.strip() for m in (rate_models or "").split(",") if m.strip()), rate_max_tokens)
    try:
        routes = web_routes(state, stage_lists, rate)
    except RateError as e:
        state.scheduler.close()
        _fail(e)
    try:
        sock = bind(host, port)
    except OSError as e:
        _fail(OSError(f"cannot bind {host}:{port}: {e.strerror or e}"))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    h, p = sock.getsockname()[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"

    def ready():
        click.echo(f"persllm serve: listening on {url}/v1 (models: {', '.join(personas)}; pages: {url}/ "
                   f"and {url}/rate)")
        sys.stdout.flush()

    try:
        run_server(build_app(state, routes), sock, on_ready=ready)
    except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then re-raises it (unless SIGINT was ignored)
        pass
    finally:
        state.scheduler.close()
    click.echo("persllm serve: stopped", err=True)


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
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
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
    from persllm_jax.serve.chat import ChatSession, repl
    from persllm_jax.serve.engine import SamplingParams
    from persllm_jax.serve.personas import ModelPool, TalkError, persona_stages

    pool = ModelPool(_dtype(dtype), chunk=chunk)
    try:
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
    except TalkError as e:
        _fail(e)
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
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
def simulate(agents, scene, turns, out, model_spec, max_new_tokens, temperature, top_p, seed, dtype):
    """Several personas talk in a scene (the paper's multi-agent case study); agents take turns and each sees
    the conversation from its own side (its lines as the assistant, the others' as the user).

    \b
    Example:
      persllm simulate --agent Ada=runs/ada:late --agent Darwin=runs/darwin:late \\
          --scene "A dinner at Babbage's house in 1844; they discuss machines and nature." --turns 8 --out scene
    """
    from persllm_jax.serve.engine import SamplingParams
    from persllm_jax.serve.simulate import build_agents, run_scene, write_transcript
    from persllm_jax.serve.personas import ModelPool, TalkError

    if len(agents) < 2:
        raise click.BadParameter("a scene needs at least two agents", param_hint="--agent")
    pool = ModelPool(_dtype(dtype))
    try:
        built = build_agents(pool, agents, model_spec)
    except TalkError as e:
        _fail(e)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    def show(turn):
        click.echo(f"{turn['agent']}: {turn['text']}\n")

    transcript = run_scene(built, scene, turns, sampling, on_turn=show)
    if out:
        jsonl, md = write_transcript(out, scene, built, transcript)
        click.echo(f"transcript: {jsonl} and {md}", err=True)
