"""`persllm export`: a trained run -> merged HF directory or PEFT adapter, verified, optionally pushed to the hub."""

from __future__ import annotations

import click

from persllm_jax.io import DTYPE_NAMES


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@click.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(), help="RUN_DIR of an SFT or DPO run.")
@click.option("--out", "out", required=True, type=click.Path(), help="Output directory (written atomically).")
@click.option("--format", "fmt", type=click.Choice(["merged", "peft"]), default="merged", show_default=True,
              help="merged: LoRA folded into the base, a full HF model; peft: adapter_config.json + adapter_model.safetensors.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Weights dtype of the export (default: the base model's dtype).")
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Shard merged weights above this size.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--push-to-hub", "repo_id", default=None, metavar="ORG/NAME", help="Upload OUT to this hub repo (token from HF_TOKEN).")
@click.option("--private", is_flag=True, help="Create the hub repo as private.")
@click.option("--dry-run", is_flag=True, help="With --push-to-hub: export and verify, list what would be uploaded, upload nothing.")
def export(run_dir, out, fmt, dtype, step, max_shard_size, overwrite, repo_id, private, dry_run):
    """Export RUN_DIR's trained model; the export is reloaded and its logits compared with ours before it appears
    at OUT (a mismatch exits non-zero and writes nothing).

    An SFT->DPO run exports as one model: merged, both stages folded in; peft, one adapter on the original
    base whose rank is r_sft + r_dpo (the two updates stacked, scalings folded into B).
    """
    from persllm_jax.export.driver import export as do_export
    from persllm_jax.export.hub import (
        HubError,
        check_repo_id,
        push,
        token_from_env,
        upload_plan,
    )

    if (private or dry_run) and not repo_id:
        raise HubError("--private and --dry-run go with --push-to-hub ORG/NAME")
    token = None
    if repo_id:
        check_repo_id(repo_id)
        if not dry_run:
            token = token_from_env()  # fail before the export work, not after
    result = do_export(run_dir, out, fmt, dtype, step, max_shard_size, overwrite, log=lambda s: click.echo(s, err=True))
    total = sum(n for _, n in upload_plan(result.out))
    ours = result.checks.get("export_vs_ours", {})
    click.echo(f"exported {fmt} ({result.dtype}) to {result.out}: {len(result.files)} files, {_size(total)}; "
               f"max |logit diff| vs our model {ours.get('max_abs_diff', float('nan')):.3g}, mean KL "
               f"{ours.get('mean_kl', float('nan')):.3g}; {result.seconds['total']:.1f} s")
    if not repo_id:
        return
    if dry_run:
        click.echo(f"dry run: would create {'private ' if private else ''}repo {repo_id} and upload:")
        for path, n in upload_plan(result.out):
            click.echo(f"  {path}  {_size(n)}")
        return
    url = push(result.out, repo_id, private=private, token=token)
    click.echo(f"pushed to {repo_id}: {url}")
