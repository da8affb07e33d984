"""`persllm eval`: evaluate the base model with a persona prompt and trained runs on a persona corpus;
`persllm eval compare` and `persllm eval human`."""

from __future__ import annotations

import click

from persllm_jax.settings import PRINT_CONFIG_HELP


@click.group("eval", invoke_without_command=True)
@click.option("--model", "model", default=None,
              help="Base model: HF dir, Hub id ORG/NAME[@rev] (from the cache), .gguf or `smollm2` (default: the "
                   "runs' base, else smollm2).")
@click.option("--run", "runs", multiple=True, help="A training run dir (repeatable; NAME=RUN_DIR names it). DPO runs load their SFT parent.")
@click.option("--data", "data", type=click.Path(), help="Corpus dir (uses sft/test.jsonl and manifest.json).")
@click.option("--out", "out", type=click.Path(), help="Output dir: results.json, report.md, plots, answers.")
@click.option("--judge", default=None, help="LLM judge as for data_gen: openai:MODEL or local:PATH (precision, refute rate).")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint of the judge (default: OPENAI_BASE_URL).")
@click.option("--config", "config", type=click.Path(), default=None,
              help="YAML with eval settings (every key and its default: --print-config).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one config key, e.g. --set samples=1 --set bigfive.enabled=false (repeatable).")
@click.option("--print-config", is_flag=True, help=PRINT_CONFIG_HELP)
@click.option("--personas", "personas", type=click.Path(), default=None,
              help="Persona folders (persona.yaml, subjective/ texts) for the base prompt and style similarity.")
@click.option("--no-base", is_flag=True, help="Do not evaluate the base model with a persona prompt.")
@click.option("--probes", "probes", multiple=True, type=click.Path(dir_okay=False),
              help="Point-in-time probe file (ours or TimeChara JSON/JSONL; repeatable). Default: the corpus's "
                   "probes.jsonl and controls.jsonl.")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr (answers, Big Five, judge).")
@click.pass_context
def eval_cmd(ctx, model, runs, data, out, judge, base_url, config, sets, print_config, personas, no_base, probes,
             no_progress):
    """Distinction (BLEU), precision and anti-induction (LLM judge), Big Five (option likelihood), style,
    point-in-time consistency (probes: judge-free likelihoods, judged with --judge), report.

    Several systems (base with a persona prompt, each --run) are evaluated on the same items and reported side by side.
    The config keys (answers per item, sampling, Big Five, style, judge settings) and their defaults:
    `persllm eval --print-config`.
    """
    if ctx.invoked_subcommand is not None:
        return
    from persllm_jax.eval.evaluate import evaluate, load_config

    if print_config:
        from persllm_jax import settings

        click.echo(settings.dump(load_config(config, sets)), nl=False)
        return
    if not data or not out:
        raise click.UsageError("--data and --out are required")
    evaluate(model, list(runs), data, out, judge=judge, base_url=base_url, config=config, personas_dir=personas,
             with_base=not no_base, sets=sets, probes=list(probes), progress=not no_progress)


@eval_cmd.command("compare")
@click.argument("eval_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output dir for the combined results.json, report.md, plots.")
def compare_cmd(eval_dirs, out):
    """One side-by-side report from several `persllm eval` outputs (same corpus and settings)."""
    from persllm_jax.eval.evaluate import compare

    compare(list(eval_dirs), out)


@eval_cmd.command("human")
@click.option("--db", "db", required=True, type=click.Path(), help="The /rate judgement database (persllm serve --rate-db).")
@click.option("--out", required=True, type=click.Path(),
              help="Output dir: human.json, human.md, human.png (an eval dir gets the section in its report.md).")
@click.option("--bootstrap", default=2000, show_default=True, type=click.IntRange(100), help="Bootstrap resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
def human_cmd(db, out, bootstrap, seed):
    """Human judgements from /rate: win rates per model pair and criterion (bootstrap CIs), Bradley-Terry
    scores across models, inter-rater agreement (Cohen's kappa)."""
    from persllm_jax.eval.evaluate import human_eval

    h = human_eval(db, out, n_boot=bootstrap, seed=seed)
    click.echo(f"eval human: {h['n_judgements']} judgements, {len(h['models'])} models -> {out}/human.md", err=True)
