"""`persllm train sft`: LoRA (or full) supervised fine-tuning. `train` is a group so DPO can add `train dpo`."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from persllm_jax.train.config import ConfigError, TrainConfig, load_config


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
        base = yaml.safe_load(saved.read_text()) or {}
    cfg = load_config(cls, config_file, sets, base=base)
    set_keys = {item.split("=", 1)[0].strip() for item in sets}
    for key, value in cli.items():
        if value is not None and key not in set_keys:
            setattr(cfg, key, value)
    return cfg


def _fail(e: Exception):
    raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


@train.command("sft")
@click.option("--model", "model", default=None, help="HF dir, .gguf file or `smollm2` (default: from config).")
@click.option("--data", "data", default=None, help="Corpus dir (reads sft/train.jsonl) or a .jsonl file.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="RUN_DIR for config, metrics, checkpoints.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable), e.g. lora.rank=8.")
@click.option("--resume", is_flag=True, help="Require a checkpoint in RUN_DIR and continue from it (rerunning into a RUN_DIR with checkpoints resumes anyway).")
@click.option("--no-progress", is_flag=True, help="No progress bar (metrics.jsonl is still written).")
def sft(model, data, out, config_file, sets, resume, no_progress):
    """Supervised fine-tuning on CORPUS/sft/train.jsonl; loss on assistant tokens only."""
    from persllm_jax.train.data import DataError
    from persllm_jax.model.lora import LoraError
    from persllm_jax.train.sharding import MeshError
    from persllm_jax.model.weights import WeightsError

    run_dir = Path(out)
    try:
        cfg = resolve_config(TrainConfig, run_dir, config_file, sets, resume, {"model": model, "data": data})
        if not cfg.data:
            raise ConfigError("no training data: pass --data CORPUS_DIR or set `data` in the config")
        from persllm_jax.train.sft import run

        summary = run(cfg, run_dir, progress=not no_progress, log=lambda s: click.echo(s, err=True))
    except (ConfigError, DataError, LoraError, MeshError, WeightsError, FileNotFoundError) as e:
        _fail(e)
    last = summary["last"]
    if last:
        click.echo(f"done: step {last['step']}, loss {last['loss']:.4f}, {last['tokens_per_s']:.0f} tokens/s, "
                   f"MFU {100 * last['mfu']:.1f}%; checkpoints in {run_dir / 'checkpoints'}")
    else:
        click.echo(f"nothing to do: {run_dir} already holds step {summary['steps']}")


@train.command("dpo")
@click.option("--model", "model", default=None, help="Base model (HF dir, .gguf or `smollm2`) when there is no --from.")
@click.option("--from", "from_run", default=None, type=click.Path(file_okay=False),
              help="SFT RUN_DIR: its adapter is merged into the base, which is also the reference (omit: DPO on the base).")
@click.option("--data", "data", default=None, help="Corpus dir (reads dpo/train.jsonl) or a .jsonl file of pairs.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="RUN_DIR for config, metrics, checkpoints.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable), e.g. beta=0.2.")
@click.option("--resume", is_flag=True, help="Require a checkpoint in RUN_DIR and continue from it.")
@click.option("--no-progress", is_flag=True, help="No progress bar (metrics.jsonl is still written).")
def dpo(model, from_run, data, out, config_file, sets, resume, no_progress):
    """Direct preference optimisation on CORPUS/dpo/train.jsonl (prompt / chosen / rejected)."""
    from persllm_jax.train.data import DataError
    from persllm_jax.export.driver import ExportError
    from persllm_jax.model.lora import LoraError
    from persllm_jax.train.sharding import MeshError
    from persllm_jax.train.config import DPOConfig
    from persllm_jax.model.weights import WeightsError

    run_dir = Path(out)
    try:
        cfg = resolve_config(DPOConfig, run_dir, config_file, sets, resume,
                             {"model": model, "data": data, "from_run": from_run})
        if not cfg.data:
            raise ConfigError("no preference data: pass --data CORPUS_DIR or set `data` in the config")
        from persllm_jax.train.dpo import run

        summary = run(cfg, run_dir, progress=not no_progress, log=lambda s: click.echo(s, err=True))
    except (ConfigError, DataError, ExportError, LoraError, MeshError, WeightsError, FileNotFoundError) as e:
        _fail(e)
    last = summary["last"]
    if last:
        click.echo(f"done: step {last['step']}, loss {last['loss']:.4f}, reward accuracy "
                   f"{last['reward_accuracy']:.3f}, margin {last['reward_margin']:.4f}, "
                   f"{last['tokens_per_s']:.0f} tokens/s; checkpoints in {run_dir / 'checkpoints'}")
    else:
        click.echo(f"nothing to do: {run_dir} already holds step {summary['steps']}")
