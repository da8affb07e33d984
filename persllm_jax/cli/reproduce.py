"""`persllm reproduce CONFIG`: the whole recipe as one resumable command."""

from __future__ import annotations

from pathlib import Path

import click

from persllm_jax.cli.train import exit_preempted
from persllm_jax.pipeline.config import load, stage_config
from persllm_jax.pipeline.report import summary_table
from persllm_jax.pipeline.stages import reproduce
from persllm_jax.settings import dump
from persllm_jax.train.preemption import Preempted


@click.command("reproduce")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Output folder (default: runs/<config name>). Rerunning into it skips finished stages.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable), e.g. sft.steps=20, data.config.inputs.per_stage=2, model=DIR.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--print-config", "print_stage", type=click.Choice(["all", "data", "sft", "dpo", "eval"]), default=None,
              help="Print the resolved config (all, or one stage's, as the plain YAML its own command takes: every "
                   "key with its value) and exit; e.g. `--print-config sft > sft.yaml; persllm plan sft.yaml`.")
def reproduce_cmd(config, out, sets, no_progress, print_stage):
    """The whole PersLLM recipe: data build -> SFT -> DPO -> export (merged, PEFT) -> eval -> report.

    Each stage is skipped when its outputs are complete and valid for the current settings, and resumed when it
    was interrupted. configs/demo.yaml is the offline CPU demo; configs/paper_*.yaml the paper-scale recipes.
    Config keys: model, personas, data.{annotator, base_url, config}, sft.* (persllm train sft keys),
    dpo.* (persllm train dpo keys, plus enabled), export.{formats, dtype}, eval.{enabled, judge, base_url,
    config}; `--print-config all` prints them all with their values.
    """
    out = Path(out or Path("runs") / (Path(config).stem if config else "reproduce"))
    if print_stage:
        click.echo(dump(stage_config(load(config, sets), print_stage)), nl=False)
        return
    try:
        rows = reproduce(config, out, sets, progress=not no_progress)
    except Preempted as e:  # the stage stays "started": rerunning resumes it from this checkpoint
        exit_preempted(e, "persllm reproduce")
    click.echo(summary_table(rows, out))
    click.echo(f"report: {out / 'report.md'}")
