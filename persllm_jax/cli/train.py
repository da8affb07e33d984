"""`persllm train sft`: LoRA (or full) supervised fine-tuning. `train` is a group so DPO can add `train dpo`."""

from __future__ import annotations

from pathlib import Path

import click

from persllm_jax.settings import PRINT_CONFIG_HELP, ConfigError, alias_help, canonical_key, dump, read_file
from persllm_jax.train.config import DPOConfig, TrainConfig, load_config
from persllm_jax.train.preemption import PREEMPTED_EXIT, Preempted

CONFIG_HELP = "YAML config file (keys: `--print-config` prints every key with its value)."


@click.group()
def train():
    """Train persona models: `sft` (personified conversational tuning), then `dpo` (preference pairs)."""


def resolve_config(cls, run_dir: Path, config_file, sets, resume: bool, cli: dict):
    """Defaults < RUN_DIR/config.yaml (when resuming) < --config FILE < --model/--data < --set."""
    base = None
    saved = run_dir / "config.yaml"
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    if has_ckpt and saved.is_file():
        base = read_file(saved)
    cfg = load_config(cls, config_file, sets, base=base)
    set_keys = {canonical_key(cls, item.split("=", 1)[0].strip()) for item in sets}
    for key, value in cli.items():
        if value is not None and key not in set_keys:
            setattr(cfg, key, value)
    return cfg


def exit_preempted(e: Preempted, prog: str) -> None:
    """A preempted run's end: one line on stderr and PREEMPTED_EXIT (75, "try again"), not a PersllmError's 1."""
    click.echo(f"{prog}: {e}", err=True)
    raise SystemExit(PREEMPTED_EXIT)


def _train(kind, cls, run_dir: Path, config_file, sets, resume, cli: dict, print_config: bool, no_progress: bool):
    """The SFT or DPO command body: resolve the config, print it or train, and say how it ended."""
    cfg = resolve_config(cls, run_dir, config_file, sets, resume, cli)
    if print_config:
        click.echo(dump(cfg), nl=False)
        return
    if not cfg.data:
        what = "training" if kind == "sft" else "preference"
        raise ConfigError(f"no {what} data: pass --data CORPUS_DIR or set `data` in the config")
    if kind == "sft":
        from persllm_jax.train.sft import run
    else:
        from persllm_jax.train.dpo import run
    try:
        summary = run(cfg, run_dir, progress=not no_progress, log=lambda s: click.echo(s, err=True))
    except Preempted as e:
        exit_preempted(e, f"persllm train {kind}")
    last = summary["last"]
    if not last:
        click.echo(f"nothing to do: {run_dir} already holds step {summary['steps']}")
        return
    figures = (f"MFU {100 * last['mfu']:.1f}%" if kind == "sft" else
               f"reward accuracy {last['reward_accuracy']:.3f}, margin {last['reward_margin']:.4f}")
    if "eval_loss" in last:
        figures += f", eval_loss {last['eval_loss']:.4f}"
        if "eval_reward_accuracy" in last:
            figures += f", eval reward accuracy {last['eval_reward_accuracy']:.3f}"
    click.echo(f"done: step {last['step']}, loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, {figures}; "
               f"checkpoints in {run_dir / 'checkpoints'}")


def _aliases_epilog(cls) -> str:
    """`--help`'s last paragraph: the TRL / PEFT key names accepted (settings.py stores them under ours)."""
    return ("TRL / PEFT names accepted as aliases (stored under ours; give one name per key): "
            + alias_help(cls))


def _run_options(example_set: str):
    """The options `train sft` and `train dpo` share (after their own --model/--data)."""
    options = [
        click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                     help="RUN_DIR for config, metrics, checkpoints."),
        click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help=CONFIG_HELP),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help=f"Override a config key (repeatable), e.g. {example_set}."),
        click.option("--resume", is_flag=True, help="Require a checkpoint in RUN_DIR and continue from it "
                     "(rerunning into a RUN_DIR with checkpoints resumes anyway)."),
        click.option("--no-progress", is_flag=True, help="No progress bar (metrics.jsonl is still written)."),
        click.option("--print-config", is_flag=True, help=PRINT_CONFIG_HELP),
    ]

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@train.command("sft", epilog=_aliases_epilog(TrainConfig))
@click.option("--model", "model", default=None, help="HF dir, Hub id ORG/NAME[@rev] (from the local cache), .gguf file or `smollm2` (default: from config).")
@click.option("--data", "data", default=None, help="Corpus dir (reads sft/train.jsonl) or a .jsonl file.")
@_run_options("lora.rank=8")
def sft(model, data, out, config_file, sets, resume, no_progress, print_config):
    """Supervised fine-tuning on CORPUS/sft/train.jsonl; loss on assistant tokens only.

    Config keys: model, data, steps, epochs, batch_size, grad_accum, learning_rate, max_length, packing, dtype,
    remat, save_every, report_to (jsonl, tensorboard, wandb), eval_every, eval_data,
    lora.{enabled, rank, alpha, dropout, targets}, mesh.{data, fsdp, tensor}, ...;
    `--print-config` prints them all with their values.
    """
    _train("sft", TrainConfig, Path(out), config_file, sets, resume, {"model": model, "data": data}, print_config,
           no_progress)


@train.command("dpo", epilog=_aliases_epilog(DPOConfig))
@click.option("--model", "model", default=None, help="Base model (HF dir, Hub id ORG/NAME[@rev], .gguf or `smollm2`) when there is no --from.")
@click.option("--from", "from_run", default=None, type=click.Path(file_okay=False),
              help="SFT RUN_DIR: its adapter is merged into the base, which is also the reference (omit: DPO on the base).")
@click.option("--data", "data", default=None, help="Corpus dir (reads dpo/train.jsonl) or a .jsonl file of pairs.")
@_run_options("beta=0.2")
def dpo(model, from_run, data, out, config_file, sets, resume, no_progress, print_config):
    """Direct preference optimisation on CORPUS/dpo/train.jsonl (prompt / chosen / rejected).

    Config keys: those of `train sft` plus from_run, from_step, beta, loss_type (sigmoid | ipo | hinge),
    label_smoothing, nll_weight, precompute_ref, eval_fraction; `--print-config` prints them all with their values.
    """
    _train("dpo", DPOConfig, Path(out), config_file, sets, resume,
           {"model": model, "data": data, "from_run": from_run}, print_config, no_progress)
