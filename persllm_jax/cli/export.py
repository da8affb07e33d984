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
@click.option("--push-to-hub", "repo_id", default=None, metavar="ORG/NAME",
              help="Upload OUT to this Hub repo (token: HF_TOKEN, else the `hf auth login` store; never printed).")
@click.option("--private", is_flag=True, help="Create the hub repo as private.")
@click.option("--dry-run", is_flag=True, help="With --push-to-hub: export and verify, list what would be uploaded, upload nothing.")
@click.option("--eval", "eval_dir", default=None, type=click.Path(file_okay=False),
              help="A `persllm eval --out` folder: its results for this run go into the model card (model-index).")
@click.option("--no-progress", is_flag=True, help="No progress bar for the load / write / verify phases.")
def export(run_dir, out, fmt, dtype, step, max_shard_size, overwrite, repo_id, private, dry_run, eval_dir,
           no_progress):
    """Export RUN_DIR's trained model; the export is reloaded and its logits compared with ours before it appears
    at OUT (a mismatch exits non-zero and writes nothing).

    An SFT->DPO run exports as one model: merged, both stages folded in; peft, one adapter on the original
    base whose rank is r_sft + r_dpo (the two updates stacked, scalings folded into B). That rank, `r` in
    adapter_config.json, is what a LoRA server needs: vLLM serves the adapter over the base with
    `--enable-lora --max-lora-rank N` (N >= r, one of 8, 16, 32, 64, ...); the command prints N.

    The model card (README.md) records the base's Hub id, license and the personas' languages; with
    --push-to-hub its usage snippet loads ORG/NAME.
    """
    from persllm_jax.export.driver import export as do_export
    from persllm_jax.export.hub import (
        HubError,
        check_repo_id,
        hub_token,
        push,
        upload_plan,
    )
    from persllm_jax.export.peft import vllm_max_lora_rank

    if (private or dry_run) and not repo_id:
        raise HubError("--private and --dry-run go with --push-to-hub ORG/NAME")
    token = None
    if repo_id:
        check_repo_id(repo_id)
        if not dry_run:
            token = hub_token()  # fail before the export work, not after
    result = do_export(run_dir, out, fmt, dtype, step, max_shard_size, overwrite, log=lambda s: click.echo(s, err=True),
                       repo_id=repo_id, eval_dir=eval_dir, progress=not no_progress)
    total = sum(n for _, n in upload_plan(result.out))
    ours = result.checks.get("export_vs_ours", {})
    click.echo(f"exported {fmt} ({result.dtype}) to {result.out}: {len(result.files)} files, {_size(total)}; "
               f"max |logit diff| vs our model {ours.get('max_abs_diff', float('nan')):.3g}, mean KL "
               f"{ours.get('mean_kl', float('nan')):.3g}; {result.seconds['total']:.1f} s")
    if fmt == "peft":
        import json

        r = int(json.loads((result.out / "adapter_config.json").read_text())["r"])
        click.echo(f"adapter rank r={r}; serve with vLLM: --enable-lora --max-lora-rank {vllm_max_lora_rank(r)}")
    if not repo_id:
        return
    if dry_run:
        click.echo(f"dry run: would create {'private ' if private else ''}repo {repo_id} and upload:")
        for path, n in upload_plan(result.out):
            click.echo(f"  {path}  {_size(n)}")
        return
    url = push(result.out, repo_id, private=private, token=token)
    click.echo(f"pushed to {repo_id}: {url}")
