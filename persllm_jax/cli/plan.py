"""`persllm plan CONFIG`: will a training recipe fit the chips it is meant for? Checked before launch, on a CPU
(emulated devices, train/plan.py) or with the real TPU compiler (`--target tpu-...`, train/tpu_plan.py)."""

from __future__ import annotations

import dataclasses
import json

import click

from persllm_jax.model.shapes import SHAPES
from persllm_jax.train.plan import (
    DEVICE_KINDS,
    GiB,
    capacity,
    default_devices,
    format_suggestions,
    load_train_config,
    plan_config_dict,
    report,
    run_worker,
    suggestions,
)
from persllm_jax.train.tpu_plan import TARGETS

HELP = ("Compile the train step of CONFIG_FILE for N emulated devices and check it fits the chip's memory.\n\n"
        "CONFIG_FILE is a train config (SFT or DPO) or a `persllm reproduce` recipe (its sft stage). No "
        "weights are read: the model may be a named shape, e.g. `model: shape:llama-8b` (shapes: "
        + ", ".join(SHAPES) + "). With --target tpu-..., the SFT and DPO steps (a recipe's two stages; a train "
        "config read as both) are compiled by the TPU compiler (libtpu) instead. Exits 1 when the step does not "
        "fit, with fixes to try. With --serve, the server's programs (prefill, decode) are planned instead: KV-cache "
        "bytes, peak per chip and the largest batch that fits (CONFIG_FILE optional: --model names the model). "
        "See docs/scale.md. "
        "Config keys: those of `persllm train sft` (--print-config lists them with their values).")


def _is_recipe(config_file) -> bool:
    """A `persllm reproduce` recipe (stage sections or includes) rather than a train config."""
    from persllm_jax.settings import read_file

    doc = read_file(config_file)
    return "sft" in doc or "include" in doc


def _plan_config(config_file, sets, model):
    """The train config to plan: CONFIG_FILE itself, or the sft stage of a `persllm reproduce` recipe."""
    if _is_recipe(config_file):
        from persllm_jax.pipeline.config import load, train_config

        return load_train_config(config_file, sets, model, base=plan_config_dict(train_config(load(config_file), "sft")))
    return load_train_config(config_file, sets, model)


@click.command("plan", help=HELP)
@click.argument("config_file", type=click.Path(dir_okay=False), required=False)
@click.option("--devices", "n_devices", type=int, default=None,
              help="Devices to plan for (default: the config's mesh size, or 1 when an axis is -1).")
@click.option("--device-kind", "kind", type=click.Choice(list(DEVICE_KINDS)), default="cpu", show_default=True,
              help="Chip whose memory the plan is checked against.")
@click.option("--model", default=None, help="Override the config's model (HF dir, config.json, .gguf, shape:NAME).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--headroom", type=float, default=0.9, show_default=True,
              help="Fraction of the device memory the step may use (the rest: runtime, fragmentation).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--print-config", is_flag=True, help="Print the resolved train config (every key with its value) and exit.")
@click.option("--target", default="cpu", show_default=True, metavar="TARGET",
              help="cpu (emulated devices, --devices/--device-kind) or a TPU slice compiled by the real TPU "
                   "compiler, SFT and DPO steps: " + ", ".join(TARGETS) + ". See docs/scale.md.")
@click.option("--stage", type=click.Choice(["all", "sft", "dpo"]), default="all", show_default=True,
              help="--target tpu-...: plan only this stage's step (a recipe's sft or dpo section).")
@click.option("--no-roofline", is_flag=True,
              help="--target tpu-...: memory only, no HLO costs and roofline (their costs-only compiles of one "
                   "micro-step, the layer scan unrolled, take about twice the step's own: ~6 minutes a stage for an "
                   "8B model on 2 cores).")
@click.option("--serve", is_flag=True,
              help="Plan `persllm serve` instead of training: one model replica per chip, its prefill and decode "
                   "programs for --batch slots of --cache-tokens positions.")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1),
              help="--serve: KV-cache slots (persllm serve --max-batch).")
@click.option("--cache-tokens", default=4096, show_default=True, type=click.IntRange(16),
              help="--serve: positions per slot, prompt + completion (persllm serve --slot-tokens).")
@click.option("--serve-dtype", default="bfloat16", show_default=True,
              help="--serve: weights, KV cache and compute dtype (persllm serve --dtype).")
@click.option("--adapters", default=8, show_default=True, type=click.IntRange(0),
              help="--serve: adapters in the bank (persllm serve --max-adapters); 0 = the base only.")
@click.option("--lora-rank", default=16, show_default=True, type=click.IntRange(1),
              help="--serve: the largest adapter rank (the bank pads every adapter to it).")
def plan_command(config_file, n_devices, kind, model, sets, headroom, as_json, print_config, target, stage,
                 no_roofline, serve, batch, cache_tokens, serve_dtype, adapters, lora_rank):
    from persllm_jax.settings import dump

    if serve:
        if sets and config_file is None:
            raise click.UsageError("--set changes a CONFIG_FILE; with --serve --model there is none (use the --serve "
                                   "options: --batch, --cache-tokens, --serve-dtype, --adapters, --lora-rank)")
        return _plan_serve(config_file, model, sets, target, headroom, as_json, batch, cache_tokens, serve_dtype,
                           adapters, lora_rank)
    if config_file is None:
        raise click.UsageError("CONFIG_FILE is required (except with --serve --model MODEL)")
    cfg = _plan_config(config_file, sets, model)
    if print_config:
        click.echo(dump(cfg), nl=False)
        return
    if target != "cpu":
        return _plan_tpu(config_file, target, cfg, model, sets, headroom, as_json, stage, not no_roofline)
    if stage != "all" or no_roofline:
        raise click.UsageError("--stage and --no-roofline go with --target tpu-... (the CPU plan is the SFT step's "
                               "memory)")
    n = n_devices or default_devices(cfg)
    cap = capacity(kind, n)
    result = run_worker(plan_config_dict(cfg), n)
    text, fits = report(result, kind, cap, headroom)
    if as_json:
        fixes = [] if fits else [{"set": a, "why": w} for a, w in suggestions(cfg, result, n)]
        click.echo(json.dumps({**result, "device_kind": kind, "capacity": cap, "fits": fits, "suggestions": fixes},
                              indent=1))
    else:
        click.echo(text)
    if not fits:
        fixes = format_suggestions(suggestions(cfg, result, n))
        raise click.ClickException(f"{config_file}: the step needs {result['bytes']['peak'] / GiB:.2f} GiB per "
                                   f"device, more than {headroom * cap / GiB:.1f} GiB on {n} x {kind}. Try:\n{fixes}")


def _stage_configs(config_file, sft, sets, model) -> dict:
    """{"sft": TrainConfig, "dpo": DPOConfig} for --target: a recipe's two stages (dpo when enabled), or a train
    config file read as each (SFT ignores DPO-only keys, DPO takes its defaults for keys the file lacks)."""
    from persllm_jax.train.config import DPOConfig, TrainConfig, load_config

    stages = {"sft": load_config(TrainConfig, None, base=plan_config_dict(sft))}
    over = {"model": model} if model else {}
    if _is_recipe(config_file):
        from persllm_jax.pipeline.config import load, train_config

        recipe = load(config_file)
        if recipe["dpo"].get("enabled", True):
            dpo = dataclasses.asdict(train_config(recipe, "dpo"))
            stages["dpo"] = load_config(DPOConfig, None, sets, base={**dpo, **over})
    else:
        stages["dpo"] = load_config(DPOConfig, config_file, sets, base=over or None)
        if model:  # --model beats the file
            stages["dpo"].model = model
    return stages


def _plan_tpu(config_file, target, sft, model, sets, headroom, as_json, stage="all", costs=True):
    """--target tpu-...: the SFT and DPO steps compiled by libtpu in a worker; exit 1 with fixes when one does not fit."""
    from persllm_jax.train.tpu_plan import run_tpu_worker
    from persllm_jax.train.tpu_report import refusal, report, with_roofline

    cfgs = _stage_configs(config_file, sft, sets, model)
    if stage != "all":
        if stage not in cfgs:
            raise click.UsageError(f"--stage {stage}: {config_file} has no {stage} step to plan")
        cfgs = {stage: cfgs[stage]}
    result = with_roofline(run_tpu_worker({k: dataclasses.asdict(c) for k, c in cfgs.items()}, target, costs))
    text, fits = report(result, headroom)
    click.echo(json.dumps({**result, "headroom": headroom, "fits": fits}, indent=1) if as_json else text)
    if not fits:
        raise click.ClickException(refusal(result, cfgs, headroom, str(config_file)))


def _plan_serve(config_file, model, sets, target, headroom, as_json, batch, cache_tokens, dtype, adapters, lora_rank):
    """--serve: the server's programs compiled for one chip of TARGET; exit 1 when the asked batch does not fit."""
    from persllm_jax.io import DTYPE_NAMES
    from persllm_jax.serve.plan import ServeShape, report, run_serve_plan

    if dtype not in DTYPE_NAMES:
        raise click.BadParameter(f"{dtype!r}: one of {', '.join(DTYPE_NAMES)}", param_hint="--serve-dtype")
    if model is None:
        if config_file is None:
            raise click.UsageError("--serve needs --model MODEL (or a CONFIG_FILE whose model to plan)")
        model = _plan_config(config_file, sets, None).model
    shape = ServeShape(model=model, batch=batch, cache_tokens=cache_tokens, dtype=dtype, adapters=adapters,
                       lora_rank=lora_rank)
    result = run_serve_plan(shape, target, headroom)
    text, fits = report(result)
    click.echo(json.dumps({**result, "fits": fits}, indent=1) if as_json else text)
    if not fits:
        raise click.ClickException(f"the server does not fit one chip of {target} at --batch {batch} --cache-tokens "
                                   f"{cache_tokens}: lower them (largest batch that fits: "
                                   f"{result.get('largest_batch', 'none')})")
