"""The README.md model card of an export, built with `huggingface_hub.ModelCard` / `ModelCardData` so its
metadata is what the Hub parses: `base_model` (the Hub id, never a local path), `license` (from the base's own
card or config), `language` (each persona's, from the corpus manifest that persona.yaml fed; default `en`),
`tags`, `datasets` (when the corpus came from a Hub dataset id) and `model-index` (`eval_results`) from our
evaluation. The body: base model, personas and stages with data counts, training settings of every stage,
evaluation results and the export's own verification figures, and a usage snippet naming the repo pushed to
(or the local export folder)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from persllm_jax.model.hub_models import parse_hub_id
from persllm_jax.runs import last_metrics

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"  # SmolLM2-135M-Instruct's license (its card on the Hub)
MAX_EVAL_ROWS = 60
SETTINGS = ("steps", "epochs", "batch_size", "grad_accum", "learning_rate", "warmup_steps", "min_lr_ratio",
            "weight_decay", "max_length", "packing", "dtype", "seed", "beta", "loss_type", "label_smoothing",
            "sft_weight")
# headline numbers of one system in a `persllm eval` results.json (as pipeline/report.headline, which export
# may not import): (card name, path in the system's results)
HEADLINE = (("bleu_intra", "distinction.average.intra"), ("bleu_stage", "distinction.average.stage"),
            ("bleu_inter", "distinction.average.inter"), ("break_rate", "anti_induction.break_rate_all"),
            ("refute_rate", "anti_induction.refute_rate"), ("precision", "precision.overall.mean"),
            ("big5_stage_change", "bigfive.summary.dynamic_mean_l2"),
            ("big5_persona_distance", "bigfive.summary.distinction_mean_l2"),
            ("style_margin", "style.own_minus_other_mean"))


def hub_base(chain) -> tuple[str, str | None] | None:
    """(Hub id, revision) of the base when it is known as one: the embedded SmolLM2, or the id given to train."""
    from persllm_jax.model.weights import EMBEDDED_FILE

    if chain.base_spec == "smollm2" or str(chain.base.source).endswith(EMBEDDED_FILE):
        return EMBEDDED_HUB_ID, None
    for spec in (chain.base_spec, chain.stages[0].info.get("model")):
        hub = parse_hub_id(spec)
        if hub:
            return hub
    return None


def base_model_id(chain) -> str:
    """The base's Hub id when it has one (also from config.json `_name_or_path`), else its local path."""
    hub = hub_base(chain)
    if hub:
        return hub[0]
    name = chain.base.hf_config.get("_name_or_path")
    if isinstance(name, str) and parse_hub_id(name):
        return parse_hub_id(name)[0]
    return str(Path(chain.base.source).absolute())


def base_license(chain) -> str | None:
    """`license:` of the base model's own README.md front matter (or config.json), when the base folder has one."""
    from huggingface_hub.repocard import metadata_load

    if hub_base(chain) == (EMBEDDED_HUB_ID, None):
        return EMBEDDED_LICENSE
    src = Path(chain.base.source)
    readme = (src if src.is_dir() else src.parent) / "README.md"
    try:
        meta = metadata_load(readme) if readme.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        meta = None
    lic = (meta or {}).get("license") or chain.base.hf_config.get("license")
    return str(lic) if isinstance(lic, str) and lic.strip() else None


def hub_datasets(chain) -> list[str]:
    """Hub dataset ids the stages trained on (a `data`/`dataset` that names no local path but a Hub id)."""
    out = []
    for st in chain.stages:
        for key in ("dataset", "data"):
            hub = parse_hub_id(str(st.info.get(key) or "").split(":")[0])
            if hub and hub[0] not in out:
                out.append(hub[0])
    return out


def find_manifest(data_path: str | None, run_dir: Path) -> dict | None:
    if not data_path:
        return None
    p = Path(data_path)
    if not p.is_absolute() and not p.exists():
        p = run_dir / p
    root = p if p.is_dir() else (p.parent.parent if p.parent.name in ("sft", "dpo", "test") else p.parent)
    m = root / "manifest.json"
    try:
        return json.loads(m.read_text()) if m.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _get(d, path: str):
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _system_of(results: dict, run_dir: Path) -> dict | None:
    """The system of a `persllm eval` results.json evaluated on `run_dir` (else its only trained system)."""
    systems = {k: v for k, v in (results.get("systems") or {}).items() if isinstance(v, dict)}
    want = Path(run_dir).resolve()
    for s in systems.values():
        if s.get("run_dir") and Path(s["run_dir"]).resolve() == want:
            return s
    trained = [s for s in systems.values() if s.get("kind") == "run"]
    return trained[0] if len(trained) == 1 else None


def find_eval(run_dir: Path, eval_dir: Path | None = None) -> dict:
    """Flat {name: number} of the run's evaluation results: RUN_DIR/eval.json, eval_results.json or eval/*.json
    (so `persllm eval --run RUN_DIR --out RUN_DIR/eval` lands in the card), and EVAL_DIR/*.json when given; of a
    `persllm eval` results.json, the headline numbers of this run's system; timings and failure counts left out."""
    files = [run_dir / "eval.json", run_dir / "eval_results.json"] + sorted((run_dir / "eval").glob("*.json"))
    if eval_dir is not None:
        files += sorted(Path(eval_dir).glob("*.json"))
    out: dict = {}

    def flat(prefix, v):
        if isinstance(v, bool):
            return
        if "timings" in prefix or "failed" in prefix or len(out) >= MAX_EVAL_ROWS:
            return
        if isinstance(v, (int, float)):
            out[prefix] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                flat(f"{prefix}.{k}" if prefix else str(k), x)

    for f in dict.fromkeys(files):
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "systems" in data:
            system = _system_of(data, run_dir)
            for name, path in HEADLINE if system else ():
                v = _get(system, path)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[name] = v
        else:
            flat(f.stem if f.parent.name == "eval" else "", data)
    return out


def _settings(run_dir: Path) -> dict:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: cfg[k] for k in SETTINGS if k in cfg}


def _stage_label(st, i, n) -> str:
    kind = st.info.get("stage") or st.info.get("algorithm") or ("dpo" if i > 0 else "sft")
    return str(kind).upper()


def _eval_results(evals: dict, dataset: str, dataset_id: str | None) -> list:
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="text-generation", task_name="persona role-play", dataset_type=dataset_id
                       or "persllm-persona-corpus", dataset_name=dataset, metric_type=k, metric_name=k,
                       metric_value=v) for k, v in evals.items()]


def card_data(chain, fmt: str, labels: list[str], manifest: dict | None, evals: dict, title: str):
    """The card's metadata (the YAML front matter the Hub reads)."""
    from huggingface_hub import ModelCardData

    base_id = base_model_id(chain)
    personas = (manifest or {}).get("personas") or {}
    languages = list(dict.fromkeys(str(p.get("language") or "en") for p in personas.values())) or ["en"]
    datasets = hub_datasets(chain)
    tags = ["persllm", "persona", "jax"] + [lb.lower() for lb in labels] + (
        ["lora"] if any(st.kind == "lora" for st in chain.stages) else [])
    corpus = Path(str(chain.stages[0].info.get("data") or "corpus"))
    corpus_name = (corpus.parent.parent if corpus.parent.name in ("sft", "dpo") else corpus).name or "corpus"
    return ModelCardData(
        base_model=None if Path(base_id).is_absolute() else base_id, license=base_license(chain),
        language=languages[0] if len(languages) == 1 else languages,
        library_name="peft" if fmt == "peft" else "transformers", pipeline_tag="text-generation", tags=tags,
        datasets=datasets or None, model_name=title if evals else None,
        eval_results=_eval_results(evals, corpus_name, datasets[0] if datasets else None) if evals else None)


def render(chain, fmt: str, dtype: str, checks: dict, repo_id: str | None = None, local: str | None = None,
           eval_dir: Path | None = None) -> str:
    """README.md text; the usage snippet loads `repo_id` (the Hub repo pushed to), else the `local` export folder."""
    where = repo_id or local or "path/to/this/export"
    base_id = base_model_id(chain)
    manifest = None
    for st in chain.stages:
        manifest = manifest or find_manifest(st.info.get("data"), st.run_dir)
    labels = [_stage_label(st, i, len(chain.stages)) for i, st in enumerate(chain.stages)]
    personas = (manifest or {}).get("personas") or {}
    title_names = ", ".join(p.get("name", k) for k, p in personas.items()) or "persona"
    evals = {}
    for st in chain.stages:
        evals.update(find_eval(st.run_dir, eval_dir if st is chain.stages[-1] else None))
    title = f"{title_names}: a PersLLM persona model"
    data = card_data(chain, fmt, labels, manifest, evals, repo_id or title)
    lines = ["---", data.to_yaml(), "---", "",
             f"# {title}", "",
             f"Trained with persllm-jax ({' then '.join(labels)}) and exported as "
             + ("a merged Hugging Face checkpoint" if fmt == "merged" else "a PEFT LoRA adapter") + f" in {dtype}.", ""]
    lines += ["## Base model", "", f"- `{base_id}`"]
    if chain.base.is_gguf:
        lines.append(f"- weights dequantized from the GGUF file `{Path(chain.base.source).name}` (the trained model's "
                     "base is the dequantized model, not the original full-precision checkpoint)")
    c = chain.base.cfg
    lines += [f"- architecture `{(chain.base.hf_config.get('architectures') or ['?'])[0]}` ({c.model_type}), "
              f"{c.num_layers} layers, hidden {c.hidden_size}, vocabulary {c.vocab_size}", ""]
    if personas:
        lines += ["## Personas and stages", "", "| persona | stage | label | train | test | dpo |", "|---|---|---|---|---|---|"]
        counts = manifest.get("counts") or {}
        for key, p in personas.items():
            for s in p.get("stages") or []:
                cnt = (counts.get(key) or {}).get(s.get("id")) or {}
                n = {k: sum(Counter(cnt.get(k) or {}).values()) for k in ("train", "test", "dpo")}
                lines.append(f"| {p.get('name', key)} | {s.get('id')} | {s.get('label', '')} | {n['train']} | "
                             f"{n['test']} | {n['dpo']} |")
        t = manifest.get("totals") or {}
        lines += ["", "## Data", "", f"- SFT conversations: {t.get('sft_train', '?')} train, {t.get('sft_test', '?')} test "
                  f"({t.get('general_rows', 0)} general-domain rows mixed in, {t.get('sft_train_rows', '?')} rows in all)",
                  f"- DPO pairs: {t.get('dpo', 0)}; items rejected while building: {t.get('rejected', 0)}", ""]
    lines += ["## Training", ""]
    for st, label in zip(chain.stages, labels):
        lo = st.lora_info
        what = (f"LoRA r={lo.get('rank')}, alpha={lo.get('alpha')}, targets {', '.join(lo.get('targets') or [])}"
                if st.kind == "lora" else "full fine-tuning")
        stats = st.info.get("data_stats") or {}
        last = last_metrics(st.run_dir)
        lines.append(f"- **{label}** (`{st.run_dir.name}`, checkpoint step {st.step} of "
                     f"{st.info.get('total_steps', '?')}): {what}")
        if stats:
            lines.append(f"  - data: {stats.get('conversations', '?')} conversations, "
                         f"{stats.get('trained_tokens', '?')} trained tokens")
        settings = _settings(st.run_dir)
        if settings:
            lines.append("  - settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        if last.get("loss") is not None:
            lines.append(f"  - final logged loss {last['loss']:.4f} at step {last.get('step')}")
    if fmt == "peft" and len(chain.stages) > 1:
        lines += ["", "The stages' LoRA updates are stacked into one adapter of rank "
                  "r1 + r2 on the original base, with each stage's alpha/r folded into its B matrix."]
    if evals:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in evals.items()]
    if checks:
        lines += ["", "## Export verification", "",
                  "Reloaded after writing and compared with the JAX model on a few prompts:", ""]
        for name, s in checks.items():
            lines.append(f"- {name}: max |logit diff| {s['max_abs_diff']:.3g} (logit scale {s['logit_scale']:.3g}), "
                         f"mean KL {s['mean_kl']:.3g}, top-1 agreement {s['top1_agree']:.3f}")
    lines += ["", "## Use", "", "```python"]
    if fmt == "merged":
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tok = AutoTokenizer.from_pretrained("{where}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{where}")']
    else:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
                  f'model = PeftModel.from_pretrained(base, "{where}")']
    lines += ["```", ""]
    return "\n".join(lines)


def write_model_card(out_dir: Path, chain, fmt: str, dtype: str, checks: dict, repo_id: str | None = None,
                     local: str | None = None, eval_dir: Path | None = None) -> None:
    from huggingface_hub import ModelCard

    text = render(chain, fmt, dtype, checks, repo_id, local, eval_dir)
    ModelCard(text).save(Path(out_dir) / "README.md")


__all__ = ["EMBEDDED_HUB_ID", "base_license", "base_model_id", "card_data", "find_eval", "find_manifest",
           "hub_base", "hub_datasets", "render", "write_model_card"]
