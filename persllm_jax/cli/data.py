"""`persllm data ...`: build persona corpora."""

from __future__ import annotations

import sys

import click

from persllm_jax.errors import PersllmError
from persllm_jax.settings import PRINT_CONFIG_HELP, dump


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
@click.option("--print-config", is_flag=True, help=PRINT_CONFIG_HELP)
def build_cmd(personas_dir, out_dir, annotator, config_file, sets, base_url, cache_dir, restart, no_progress,
              print_config):
    """Build a persona corpus: inputs, CoT responses, dedup/split, DPO pairs, mixing.

    Config keys (data_gen/config.py DEFAULTS, e.g. inputs.per_stage, responses.max_tokens, annotator.concurrency,
    split.test_fraction, mix.general): `--print-config` prints them all with their values. Exits 2 on bad input,
    3 when annotator requests failed after all retries (rerun to retry them).
    """
    from data_gen.config import load_config
    from data_gen.pipeline import build, failure_message

    try:
        cfg = load_config(config_file, sets)
        if print_config:
            click.echo(dump(cfg), nl=False)
            return
        m = build(personas_dir, out_dir, annotator, cfg, base_url=base_url, cache_dir=cache_dir, restart=restart,
                  progress=not no_progress, echo=click.echo)
    except PersllmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    problem = failure_message(m)
    if problem:
        click.echo(f"error: {problem}", err=True)
        sys.exit(3)


@data.command("check")
@click.argument("corpus_dir", type=click.Path(exists=True, file_okay=False))
def check_cmd(corpus_dir):
    """Validate a corpus folder's sft/ and dpo/ rows against the formats; exit 1 on any error, on an empty
    training split, and on a build its manifest marks incomplete (annotator requests that failed)."""
    from pathlib import Path

    from data_gen.formats import check_dpo_row, check_sft_row
    from data_gen.pipeline import failure_message
    from persllm_jax.io import read_json, read_jsonl

    bad = 0
    manifest = Path(corpus_dir) / "manifest.json"
    if manifest.is_file():
        try:
            m = read_json(manifest)
        except PersllmError as e:
            click.echo(str(e), err=True)
            bad += 1
        else:
            problem = failure_message(m) if "rejected_by_reason" in m and "totals" in m else None
            if m.get("complete") is False or problem:
                click.echo(f"{manifest}: the build is incomplete: {problem or 'marked incomplete'}", err=True)
                bad += 1
    for name, check in (("sft/train.jsonl", check_sft_row), ("sft/test.jsonl", check_sft_row),
                        ("dpo/train.jsonl", check_dpo_row)):
        path = Path(corpus_dir) / name
        if not path.exists():
            click.echo(f"{path}: missing", err=True)
            bad += 1
            continue
        try:
            rows = read_jsonl(path)
        except PersllmError as e:
            click.echo(str(e), err=True)
            bad += 1
            continue
        ids = set()
        for i, row in enumerate(rows, 1):
            errs = check(row)
            if isinstance(row, dict) and row.get("id") in ids:
                errs.append(f"duplicate id {row.get('id')!r}")
            ids.add(row.get("id") if isinstance(row, dict) else None)
            for e in errs:
                bad += 1
                if bad <= 20:
                    click.echo(f"{path}:{i}: {e}", err=True)
        click.echo(f"{name}: {len(rows)} rows")
        if name == "sft/train.jsonl" and not rows:
            click.echo(f"{path}: no training rows", err=True)
            bad += 1
    if bad:
        click.echo(f"error: {bad} problems", err=True)
        sys.exit(1)
