"""`persllm serve`: the personas over an OpenAI-compatible API, with the chat and /rate pages."""

from __future__ import annotations

import os
import sys

import click

from persllm_jax.io import DTYPE_NAMES

MODEL_HELP = "Base model: HF directory, Hub id ORG/NAME[@rev] (from the local cache), .gguf file, or 'smollm2' (default: the run's own base model, else smollm2)."


def _parse_adapter(text: str) -> tuple[str, str, str | None]:
    from persllm_jax.serve.personas import split_model_stage

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise click.BadParameter(f"{text!r}: expected NAME=RUN_DIR[:STAGE] or NAME=PEFT_DIR", param_hint="--adapter")
    path, stage = split_model_stage(rest)
    return name, path, stage


@click.command()
@click.option("--model", "model_spec", default=None, help=MODEL_HELP)
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=RUN_DIR[:STAGE]|PEFT_DIR",
              help="A trained run, or a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), "
                   "served as model NAME (repeatable). With :STAGE, requests without a system message get that "
                   "persona stage's system prompt.")
@click.option("--base-name", default="base", show_default=True,
              help="Model name of the base model without adapter ('' to serve only the adapters).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--api-key", default=lambda: os.environ.get("PERSLLM_API_KEY") or None,
              help="Require 'Authorization: Bearer KEY' (default: $PERSLLM_API_KEY).")
@click.option("--engine", type=click.Choice(["continuous", "static"]), default="continuous", show_default=True,
              help="continuous: a fixed pool of KV slots, requests join and leave at every chunk, adapters mixed in "
                   "a batch; static: the previous engine (one model per batch, a batch runs to its end).")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="KV slots: most concurrent requests decoded in one batch (1 = one at a time).")
@click.option("--chunk", default=16, show_default=True, type=click.IntRange(1, 512),
              help="Tokens decoded per device call between stream updates (and join points): latency vs host "
                   "overhead.")
@click.option("--prefill-chunk", default=256, show_default=True, type=click.IntRange(1, 65536),
              help="Prompt tokens a joining request reads per loop (longer prompts interleave with decoding).")
@click.option("--slot-tokens", default=None, type=click.IntRange(16),
              help="Tokens per KV slot, prompt + completion (default: the model's context).")
@click.option("--max-adapters", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Most adapters over one base (the stacked adapter bank's size).")
@click.option("--access-log", is_flag=True, help="Log one line per HTTP request (stderr).")
@click.option("--default-max-tokens", default=512, show_default=True, type=click.IntRange(1),
              help="Completion limit for requests without max_tokens.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
@click.option("--rate-prompts", default=None, metavar="FILE_OR_CORPUS_DIR",
              help="Prompts for the /rate page: a corpus dir (its sft/test.jsonl) or a JSONL of prompts.")
@click.option("--rate-db", default=None, metavar="FILE",
              help="SQLite database of /rate judgements (default with --rate-prompts: ./ratings.sqlite).")
@click.option("--rate-models", default=None, metavar="NAME,NAME,...",
              help="Models compared on /rate (default: all served).")
@click.option("--rate-max-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="Answer length on /rate.")
def serve(model_spec, adapters, base_name, host, port, api_key, engine, max_batch, chunk, prefill_chunk, slot_tokens,
          max_adapters, access_log, default_max_tokens, dtype, rate_prompts, rate_db, rate_models, rate_max_tokens):
    """Serve personas over an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions, SSE
    streaming, /metrics).

    \b
    Examples:
      persllm serve --model smollm2
      persllm serve --adapter ada=runs/ada:early --adapter darwin=runs/darwin:late --api-key secret
    Then e.g. OPENAI_BASE_URL=http://127.0.0.1:8000/v1 with any OpenAI client, model "ada".
    Web pages on the same port: / (chat) and /rate (blind pairwise rating; needs --rate-prompts), see docs/web.md.
    """
    from persllm_jax.io import jnp_dtype
    from persllm_jax.runs import read_run
    from persllm_jax.serve.adapters import is_peft_dir
    from persllm_jax.serve.app import ServedModel, ServerState, bind, build_app, run_server
    from persllm_jax.serve.personas import ModelPool, find_stage
    from persllm_jax.serve.web import RateConfig, web_routes

    parsed = [_parse_adapter(a) for a in adapters]
    names = [p[0] for p in parsed] + ([base_name] if base_name else [])
    if len(set(names)) != len(names):
        raise click.BadParameter("model names must be unique (adapters and --base-name)", param_hint="--adapter")
    if not parsed and not base_name:
        raise click.UsageError("nothing to serve: give --adapter or a --base-name")
    if (rate_db or rate_models) and not rate_prompts:
        raise click.UsageError("--rate-db and --rate-models need --rate-prompts")
    pool = ModelPool(jnp_dtype(dtype), chunk=chunk)
    models, stage_lists = {}, {}
    runs = [p for p in parsed if not is_peft_dir(p[1])]
    base_spec = model_spec or (read_run(runs[0][1]).get("model") if runs else None) or "smollm2"
    base = pool.base(base_spec)
    for name, run_dir, stage in parsed:
        if is_peft_dir(run_dir):
            if stage:
                raise click.BadParameter(f"{name}: a PEFT folder has no persona stages", param_hint="--adapter")
            models[name] = ServedModel(name, pool.peft(run_dir, base_spec), None, f"{run_dir} (PEFT)")
            continue
        gen, stages = pool.run(run_dir, base_spec)
        stage_lists[name] = stages
        system = find_stage(stages, stage).system if stage else None
        models[name] = ServedModel(name, gen, system, f"{run_dir}" + (f":{stage}" if stage else ""))
    if base_name:
        models[base_name] = ServedModel(base_name, base, None, base_spec)
    state = ServerState(models, api_key=api_key, max_batch=max_batch, chunk=chunk,
                        default_max_tokens=default_max_tokens, engine=engine, prefill_chunk=prefill_chunk,
                        slot_tokens=slot_tokens, max_adapters=max_adapters)
    for line in state.describe().splitlines():
        click.echo(f"persllm serve: {line}")
    rate = None
    if rate_prompts:
        rate = RateConfig(rate_prompts, rate_db or "ratings.sqlite",
                          tuple(m.strip() for m in (rate_models or "").split(",") if m.strip()), rate_max_tokens)
    try:
        routes = web_routes(state, stage_lists, rate)
    except Exception:
        state.scheduler.close()
        raise
    try:
        sock = bind(host, port)
    except OSError as e:
        state.scheduler.close()
        raise click.ClickException(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    h, p = sock.getsockname()[:2]
    url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"

    def ready():
        click.echo(f"persllm serve: listening on {url}/v1 (models: {', '.join(models)}; pages: {url}/ "
                   f"and {url}/rate)")
        sys.stdout.flush()

    try:
        run_server(build_app(state, routes), sock, on_ready=ready, access_log=access_log)
    except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then re-raises it (unless SIGINT was ignored)
        pass
    finally:
        state.scheduler.close()
    click.echo("persllm serve: stopped", err=True)
