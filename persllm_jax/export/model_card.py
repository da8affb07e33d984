"""The README.md model card of an export: base model, personas and stages with data counts (from the corpus
manifest the run trained on), training settings of every stage, evaluation results when the run has them,
and the export's own verification figures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from persllm_jax.runs import last_metrics

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_EVAL_ROWS = 60
SETTINGS = ("steps", "epochs", "batch_size", "grad_accum", "learning_rate", "warmup_steps", "min_lr_ratio",
            "weight_decay", "max_length", "packing", "dtype", "seed", "beta", "loss_type", "label_smoothing",
            "sft_weight")


def base_model_id(chain) -> str:
    """A hub id when the base is known to be one (the embedded SmolLM2), else the base's local path."""
    from persllm_jax.model.weights import EMBEDDED_FILE

    src = str(chain.base.source)
    if chain.base_spec == "smollm2" or src.endswith(EMBEDDED_FILE):
        return EMBEDDED_HUB_ID
    name = chain.base.hf_config.get("_name_or_path")
    if isinstance(name, str) and name.count("/") == 1 and not Path(name).exists():
        return name
    return str(Path(src).absolute())


def _is_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/")) and not Path(s).exists()


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


def find_eval(run_dir: Path) -> dict:
    """Flat {name: number} of the run's evaluation results: RUN_DIR/eval.json, eval_results.json or eval/*.json
    (so `persllm eval --run RUN_DIR --out RUN_DIR/eval` lands in the card); timings and failure counts left out."""
    files = [run_dir / "eval.json", run_dir / "eval_results.json"] + sorted((run_dir / "eval").glob("*.json"))
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

    for f in files:
        if f.is_file():
            try:
                flat(f.stem if f.parent.name == "eval" else "", json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
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


def render(chain, fmt: str, dtype: str, checks: dict) -> str:
    base_id = base_model_id(chain)
    manifest = None
    for st in chain.stages:
        manifest = manifest or find_manifest(st.info.get("data"), st.run_dir)
    labels = [_stage_label(st, i, len(chain.stages)) for i, st in enumerate(chain.stages)]
    personas = (manifest or {}).get("personas") or {}
    title_names = ", ".join(p.get("name", k) for k, p in personas.items()) or "persona"
    front = {"library_name": "peft" if fmt == "peft" else "transformers", "pipeline_tag": "text-generation",
             "tags": ["persllm", "persona", "jax"] + [lb.lower() for lb in labels]
             + (["lora"] if any(st.kind == "lora" for st in chain.stages) else [])}
    if _is_hub_id(base_id):
        front = {"base_model": base_id, **front}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {title_names}: a PersLLM persona model", "",
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
    evals = {}
    for st in chain.stages:
        evals.update(find_eval(st.run_dir))
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
                  'tok = AutoTokenizer.from_pretrained("THIS_REPO")',
                  'model = AutoModelForCausalLM.from_pretrained("THIS_REPO")']
    else:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
                  'model = PeftModel.from_pretrained(base, "THIS_REPO")']
    lines += ["```", ""]
    return "\n".join(lines)


def write_model_card(out_dir: Path, chain, fmt: str, dtype: str, checks: dict) -> None:
    (Path(out_dir) / "README.md").write_text(render(chain, fmt, dtype, checks))


__all__ = ["EMBEDDED_HUB_ID", "base_model_id", "find_eval", "find_manifest", "render", "write_model_card"]
