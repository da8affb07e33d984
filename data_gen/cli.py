"""`persllm data ...`: build persona corpora."""

from __future__ import annotations

import sys

import click

from .errors import DataGenError


@click.group("data")
def data():
    """Build persona corpora (SFT and DPO data) from persona folders."""


@data.command("build")
@click.option("--personas", "personas_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of persona folders (or one persona folder).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Corpus folder to write.")
@click.option("--annotator", required=True,
              help="openai:MODEL (OPENAI_API_KEY; --base-url or OPENAI_BASE_URL) or local:PATH (local:smollm2).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Response cache folder (default: OUT/cache).")
@click.option("--restart", is_flag=True, help="Redo OUT/work (the response cache is kept).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def build_cmd(personas_dir, out_dir, annotator, config_file, sets, base_url, cache_dir, restart, no_progress):
    """Build a persona corpus: inputs, CoT responses, dedup/split, DPO pairs, mixing."""
    from .config import load_config
    from .pipeline import build

    try:
        cfg = load_config(config_file, sets)
        m = build(personas_dir, out_dir, annotator, cfg, base_url=base_url, cache_dir=cache_dir, restart=restart,
                  progress=not no_progress, echo=click.echo)
    except DataGenError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    failed = sum(v for k, v in m["rejected_by_reason"].items() if k.endswith("annotator_failed"))
    if failed:
        click.echo(f"error: {failed} annotator requests failed after all retries; rerun the same command to "
                   f"retry them (answered requests come from the cache)", err=True)
        sys.exit(3)


def main():  # python -m data_gen.cli
    data(prog_name="persllm data")


if __name__ == "__main__":
    main()
