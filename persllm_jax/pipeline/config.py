"""The reproduce recipe's config: DEFAULTS, `include:` files, `--set` overrides (all through `persllm_jax.settings`),
and each stage's section resolved into the config its own command takes (`persllm train sft --config` etc.),
checked before anything runs. `preflight` lists what the run needs from outside the config."""

from __future__ import annotations

import os
from pathlib import Path

from persllm_jax import settings
from persllm_jax.errors import PersllmError

STAGES = ("data", "sft", "dpo", "export", "eval", "report")

DEFAULTS: dict = {
    "model": "smollm2",  # base model for SFT, DPO and the eval baseline: HF dir, .gguf, or smollm2
    "personas": "personas",  # persona folders; a relative path is relative to the config file's folder
    "data": {
        "annotator": "local:smollm2",  # openai:MODEL (OPENAI_API_KEY, base_url / OPENAI_BASE_URL) or local:PATH
        "base_url": None,
        "config": {},  # data_gen settings (data_gen/config.py DEFAULTS), or a YAML file name
    },
    "report_to": None,  # e.g. [tensorboard, wandb]: the sft and dpo stages' `report_to` unless their section sets it
    "sft": {},  # TrainConfig keys (persllm_jax/train_config.py); model and data are filled in
    "dpo": {"enabled": True},  # + DPO config keys (persllm train dpo --config); model, data and parent filled in
    "export": {"formats": ["merged", "peft"], "dtype": None},
    "eval": {"enabled": True, "judge": None, "base_url": None, "config": {}},  # config: persllm eval keys or a file
}


# sections checked by their stage's own schema (train, data build, eval), merged key by key here
OPEN_SECTIONS = {"sft", "dpo", "data.config", "eval.config"}


class ReproduceError(PersllmError):
    """A problem worded for the user; the CLI prints it as one line."""


def _read_with_includes(path: Path, seen=()) -> dict:
    """The file's mapping over the files named by its `include:` (relative to it), merged key by key."""
    path = path.resolve()
    if path in seen:
        raise ReproduceError(f"{path}: include cycle")
    doc = settings.read_file(path)
    inc = doc.pop("include", None) or []
    merged: dict = {}
    for name in [inc] if isinstance(inc, str) else inc:
        merged = settings.deep_merge(merged, _read_with_includes(path.parent / name, (*seen, path)))
    return settings.deep_merge(merged, _resolve_paths(doc, path.parent))


def _resolve_paths(doc: dict, here: Path) -> dict:
    """Make the file-relative entries (personas, data/eval config files) absolute, so includes compose."""
    doc = settings.deep_merge({}, doc)
    if isinstance(doc.get("personas"), str) and not Path(doc["personas"]).is_absolute():
        doc["personas"] = str((here / doc["personas"]).resolve())
    for sec in ("data", "eval"):
        c = (doc.get(sec) or {}).get("config") if isinstance(doc.get(sec), dict) else None
        if isinstance(c, str) and not Path(c).is_absolute():
            doc[sec]["config"] = str((here / c).resolve())
    return doc


def load(path: str | Path | None, sets=()) -> dict:
    """DEFAULTS < CONFIG (with its includes) < `--set a.b=value`. Every section is checked against its stage's
    own config schema here, before anything runs."""
    doc = _read_with_includes(Path(path)) if path else {}
    cfg = settings.load(DEFAULTS, None, sets, base=doc, open_sections=OPEN_SECTIONS)
    bad = sorted(set(cfg["export"]["formats"] or []) - {"merged", "peft"})
    if bad:
        raise ReproduceError(f"config: export.formats: unknown format(s) {bad}; use merged, peft")
    data_config(cfg)
    train_config(cfg, "sft")
    if cfg["dpo"].get("enabled", True):
        train_config(cfg, "dpo")
    eval_config(cfg)
    return cfg


def _section_config(cfg: dict, section: str, load_config) -> dict:
    """A stage's own config from its `config` entry: a YAML file name, or a mapping of its keys."""
    c = cfg[section]["config"]
    try:
        return load_config(c) if isinstance(c, str) else load_config(None, base=c or {})
    except PersllmError as e:
        raise ReproduceError(f"{section}.config: {e}") from None


def data_config(cfg: dict) -> dict:
    """The data build's config (data_gen/config.py DEFAULTS)."""
    from data_gen.config import load_config

    return _section_config(cfg, "data", load_config)


def train_config(cfg: dict, stage: str):
    """The TrainConfig (sft) or DPOConfig (dpo) of a stage: its section with `model` filled in."""
    from persllm_jax.train.config import DPOConfig, TrainConfig, load_config

    section = {k: v for k, v in cfg[stage].items() if k != "enabled"}
    if cfg.get("report_to") is not None and "report_to" not in section:
        section["report_to"] = cfg["report_to"]
    try:
        c = load_config(DPOConfig if stage == "dpo" else TrainConfig, None, base=section)
    except PersllmError as e:
        raise ReproduceError(f"{stage}: {e}") from None
    c.model = str(cfg["model"])
    return c


def eval_config(cfg: dict) -> dict:
    """`persllm eval`'s config (eval/evaluate.py DEFAULTS)."""
    from persllm_jax.eval.evaluate import load_config

    return _section_config(cfg, "eval", load_config)


def stage_config(cfg: dict, stage: str) -> dict:
    """A stage's resolved settings as plain data: `persllm train sft|dpo --config`, `data build --config` and
    `eval --config` read these files as they are."""
    if stage == "all":
        return cfg
    if stage == "data":
        return data_config(cfg)
    if stage == "eval":
        return eval_config(cfg)
    return settings.to_dict(train_config(cfg, stage))


def preflight(cfg: dict, out: str | Path) -> list[str]:
    """What the run needs from outside the config (model weights, the general data, an API key), checked before
    the first stage and reported together, so a paper-scale run does not stop at the first gap hours in."""
    from persllm_jax.model.weights import WeightsError, resolve_model_path

    problems = []
    if not Path(cfg["personas"]).is_dir():
        problems.append(f"personas: {cfg['personas']} is not a folder")
    models = [("model", cfg["model"])]
    if str(cfg["data"]["annotator"]).startswith("local:"):
        models.append(("data.annotator", cfg["data"]["annotator"][len("local:"):]))
    for key, spec in models:
        try:
            resolve_model_path(spec)
        except WeightsError as e:
            problems.append(f"{key}: {e}")
    data_done = (Path(out) / "stages" / "data.json").is_file()
    general = data_config(cfg)["mix"].get("general")
    if general and not data_done and not Path(general).exists():
        problems.append(f"data.config.mix.general: {general}: no such file (the general instruction data you provide)")
    remote = [("data.annotator", cfg["data"]["annotator"], cfg["data"].get("base_url"), not data_done)]
    if cfg["eval"].get("enabled", True):
        remote.append(("eval.judge", cfg["eval"].get("judge"), cfg["eval"].get("base_url"), True))
    for key, backend, base_url, needed in remote:
        if (needed and str(backend or "").startswith("openai:") and not os.environ.get("OPENAI_API_KEY")
                and not (base_url or os.environ.get("OPENAI_BASE_URL"))):
            problems.append(f"{key}: {backend} needs OPENAI_API_KEY in the environment (or {key.split('.')[0]}.base_url "
                            f"for your own OpenAI-compatible server)")
    return problems
