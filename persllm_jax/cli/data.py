"""`persllm data ...`: build persona corpora, point-in-time probes, check a corpus."""

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


@data.command("probes")
@click.option("--personas", "personas_dir", type=click.Path(file_okay=False),
              help="Folder of persona folders (or one persona folder).")
@click.option("--timechara", "timechara", type=click.Path(dir_okay=False),
              help="Instead: convert a TimeChara JSON/JSONL file to our probe schema.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="probes.jsonl to write.")
@click.option("--annotator", default=None, help="Write the probes with this annotator (openai:MODEL or local:PATH); "
              "default: the offline rule builder.")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL).")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Annotator response cache (default: next to --out, probes_cache/).")
@click.option("--max-per-cell", default=5, show_default=True, type=click.IntRange(1),
              help="Probes per persona, kind, asked stage and fact stage.")
@click.option("--max-future-per-cell", default=15, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr (the annotator's requests).")
def probes_cmd(personas_dir, timechara, out_file, annotator, base_url, cache_dir, max_per_cell, max_future_per_cell,
               seed, no_progress):
    """Point-in-time probes (future, past-absence, past-presence, past-only) from persona folders.

    The schema of probes.jsonl: data_gen/README.md. Exits 2 on bad input, 3 when annotator requests failed
    after all retries (rerun to retry them).
    """
    from pathlib import Path

    from data_gen import probes
    from persllm_jax.io import write_jsonl

    if not personas_dir and not timechara:
        raise click.UsageError("give --personas DIR (or --timechara FILE)")
    rejected = []
    try:
        if timechara:
            from data_gen.timechara import read_timechara

            rows = read_timechara(timechara)
        else:
            backend = None
            if annotator:
                from data_gen.backends import make_backend
                from data_gen.config import DEFAULTS

                cache = Path(cache_dir) if cache_dir else Path(out_file).parent / "probes_cache"
                backend = make_backend(annotator, base_url, DEFAULTS["annotator"], cache)
            rows, rejected = probes.build_probes(personas_dir, "annotator" if annotator else "rules", backend,
                                                 max_per_cell, seed, max_future_per_cell, progress=not no_progress)
        write_jsonl(out_file, rows)
    except PersllmError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    for persona, kinds in probes.summary(rows).items():
        click.echo(f"{persona}: {sum(kinds.values())} probes ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    if rejected:
        click.echo(f"rejected: {len(rejected)} ({', '.join(sorted({r['reason'] for r in rejected}))})", err=True)
    click.echo(f"wrote {len(rows)} probes to {out_file}")
    if any(r["reason"] == "annotator_failed" for r in rejected):
        click.echo("error: some annotator requests failed after all retries; rerun the same command to retry them "
                   "(answered requests come from the cache)", err=True)
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
        click.echo(f"error: {corpus_dir}: {bad} problem{'' if bad == 1 else 's'} (listed above); not ready to train on",
                   err=True)
        sys.exit(1)
