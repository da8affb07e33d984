"""`persllm reproduce CONFIG`: persona materials -> corpus -> LoRA SFT -> DPO -> export -> eval -> report, one command.

Every stage writes into OUT and, last and atomically, a marker `OUT/stages/<stage>.json` holding the stage's key (a
hash of its settings and of the keys of the stages it reads), its outputs with their sizes, its figures and its time.
A rerun skips a stage whose marker has the current key and whose outputs are still there with the recorded sizes;
a stage that was interrupted (started marker, no done marker, same key) is resumed: the data build through its
step files and response cache, SFT and DPO from their latest checkpoints. A changed setting changes the key of that
stage and of every stage downstream, so those are redone (the annotator cache in OUT/cache is kept).

    OUT/reproduce.yaml        the resolved config
    OUT/corpus/               persllm data build (sft/ dpo/ test split, manifest.json); OUT/cache/: annotator answers
    OUT/sft/, OUT/dpo/        training runs (config.yaml, run.json, metrics.jsonl, checkpoints/)
    OUT/export/merged/        HF model (DPO folded in); OUT/export/peft/: adapter for the base model
    OUT/eval/                 persllm eval: base with a persona prompt vs SFT vs SFT+DPO (results.json, report.md)
    OUT/report.md             the stage table and the eval comparison
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

STAGES = ("data", "sft", "dpo", "export", "eval", "report")

DEFAULTS: dict = {
    "model": "smollm2",  # base model for SFT, DPO and the eval baseline: HF dir, .gguf, or smollm2
    "personas": "personas",  # persona folders; a relative path is relative to the config file's folder
    "data": {
        "annotator": "local:smollm2",  # openai:MODEL (OPENAI_API_KEY, base_url / OPENAI_BASE_URL) or local:PATH
        "base_url": None,
        "config": {},  # data_gen settings (data_gen/config.py DEFAULTS), or a YAML file name
    },
    "sft": {},  # TrainConfig keys (persllm_jax/train_config.py); model and data are filled in
    "dpo": {"enabled": True},  # + DPO config keys (persllm train dpo --config); model, data and parent filled in
    "export": {"formats": ["merged", "peft"], "dtype": None},
    "eval": {"enabled": True, "judge": None, "base_url": None, "config": {}},  # config: persllm eval keys or a file
}


class ReproduceError(Exception):
    """A problem worded for the user; the CLI prints it as one line."""


# --- config ----------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ReproduceError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ReproduceError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML") from None
    if not isinstance(doc, dict):
        raise ReproduceError(f"{path}: a reproduce config must be a YAML mapping")
    return doc


def _read_with_includes(path: Path, seen=()) -> dict:
    """The file's mapping over the files named by its `include:` (relative to it), merged key by key."""
    path = path.resolve()
    if path in seen:
        raise ReproduceError(f"{path}: include cycle")
    doc = _read_yaml(path)
    inc = doc.pop("include", None) or []
    merged: dict = {}
    for name in [inc] if isinstance(inc, str) else inc:
        merged = _deep_merge(merged, _read_with_includes(path.parent / name, (*seen, path)))
    return _deep_merge(merged, _resolve_paths(doc, path.parent))


def _resolve_paths(doc: dict, here: Path) -> dict:
    """Make the file-relative entries (personas, data/eval config files) absolute, so includes compose."""
    doc = copy.deepcopy(doc)
    if isinstance(doc.get("personas"), str) and not Path(doc["personas"]).is_absolute():
        doc["personas"] = str((here / doc["personas"]).resolve())
    for sec in ("data", "eval"):
        c = (doc.get(sec) or {}).get("config") if isinstance(doc.get(sec), dict) else None
        if isinstance(c, str) and not Path(c).is_absolute():
            doc[sec]["config"] = str((here / c).resolve())
    return doc


def load(path: str | Path | None, sets=()) -> dict:
    """DEFAULTS < CONFIG (with its includes) < `--set a.b=value` (value parsed as YAML). Every section is checked
    against its stage's own config class here, before anything runs."""
    from persllm_jax.train.config import parse_set

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        cfg = _deep_merge(cfg, _read_with_includes(Path(path)))
    try:
        pairs = parse_set(sets)
    except ValueError as e:
        raise ReproduceError(str(e)) from None
    for key, value in pairs:
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ReproduceError(f"{path or 'config'}: unknown key(s) {unknown}; valid: {', '.join(DEFAULTS)}")
    for sec in ("data", "dpo", "export", "eval"):
        if not isinstance(cfg[sec], dict):
            raise ReproduceError(f"config: {sec} must be a mapping")
    for sec, allowed in (("data", DEFAULTS["data"]), ("export", DEFAULTS["export"]), ("eval", DEFAULTS["eval"])):
        bad = sorted(set(cfg[sec]) - set(allowed))
        if bad:
            raise ReproduceError(f"config: unknown key(s) {bad} under {sec}; valid: {', '.join(allowed)}")
    bad = sorted(set(cfg["export"]["formats"] or []) - {"merged", "peft"})
    if bad:
        raise ReproduceError(f"config: export.formats: unknown format(s) {bad}; use merged, peft")
    data_config(cfg)
    train_config(cfg, "sft")
    if cfg["dpo"].get("enabled", True):
        train_config(cfg, "dpo", check_only=True)
    eval_config(cfg)
    return cfg


def data_config(cfg: dict) -> dict:
    from data_gen.config import _merge, load_config, validate
    from data_gen.errors import DataGenError

    c = cfg["data"]["config"]
    try:
        if isinstance(c, str):
            return load_config(c)
        out = load_config(None)
        _merge(out, c or {}, "data.config")
        validate(out)
        return out
    except DataGenError as e:
        raise ReproduceError(str(e)) from None


def dpo_config_class():
    """The DPO trainer's config dataclass (issue 4), or None in a build without the DPO trainer."""
    import importlib.util

    from persllm_jax.train import config as tc

    if importlib.util.find_spec("persllm_jax.train.dpo") is None:
        return None
    return getattr(tc, "DPOConfig", None)


def train_config(cfg: dict, stage: str, check_only: bool = False):
    """The TrainConfig (SFT) or DPO config of a stage: its section with `model` filled in."""
    from persllm_jax.train.config import ConfigError, TrainConfig, load_config

    section = {k: v for k, v in cfg[stage].items() if k != "enabled"}
    cls = TrainConfig
    if stage == "dpo":
        cls = dpo_config_class()
        if cls is None:
            if check_only:
                return None
            raise ReproduceError("the DPO stage needs persllm_jax/dpo.py (`persllm train dpo`), which this version "
                                 "lacks; rerun with --set dpo.enabled=false")
    try:
        c = load_config(cls, None, base=section)
    except ConfigError as e:
        raise ReproduceError(f"{stage}: {e}") from None
    c.model = str(cfg["model"])
    return c


def stage_config(cfg: dict, stage: str) -> dict:
    """A stage's resolved settings as plain data: `persllm train sft|dpo --config`, `data build --config` and
    `eval --config` read these files as they are."""
    import dataclasses

    if stage == "all":
        return cfg
    if stage == "data":
        return data_config(cfg)
    if stage == "eval":
        return eval_config(cfg)
    c = train_config(cfg, stage)
    return dataclasses.asdict(c)


def eval_config(cfg: dict) -> dict:
    from persllm_jax.eval import EvalError
    from persllm_jax.eval.evaluate import DEFAULTS as EVAL_DEFAULTS, load_config as eval_load

    c = cfg["eval"]["config"]
    if isinstance(c, str):
        try:
            return eval_load(c)
        except EvalError as e:
            raise ReproduceError(str(e)) from None
    bad = sorted(set(c or {}) - set(EVAL_DEFAULTS))
    if bad:
        raise ReproduceError(f"eval.config: unknown key(s) {bad}; valid: {', '.join(EVAL_DEFAULTS)}")
    merged = _deep_merge(EVAL_DEFAULTS, c or {})
    for k, v in (c or {}).items():
        if isinstance(EVAL_DEFAULTS[k], dict) and k != "judge":
            extra = sorted(set(v) - set(EVAL_DEFAULTS[k]))
            if extra:
                raise ReproduceError(f"eval.config.{k}: unknown key(s) {extra}; valid: {', '.join(EVAL_DEFAULTS[k])}")
    return merged


# --- stage bookkeeping -----------------------------------------------------------------------------


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1, ensure_ascii=False, default=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def materials_digest(personas: str | Path) -> str:
    """Hash of every file under the persona folders (names and bytes): edited materials redo the data build."""
    root = Path(personas)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def file_record(paths: list[Path], root: Path) -> dict[str, int]:
    """{relative path: size} of files (folders: every file under them) for the marker."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            out[str(f.relative_to(root))] = f.stat().st_size
    return out


def check_record(record: dict[str, int], root: Path) -> str | None:
    """Why the recorded outputs are no longer there as written (None: all present with their sizes)."""
    for rel, size in record.items():
        f = root / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} changed size"
    return None


def latest_checkpoint(run_dir: Path) -> int | None:
    d = run_dir / "checkpoints"
    steps = [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()] if d.is_dir() else []
    return max(steps) if steps else None


def last_metrics(run_dir: Path) -> dict:
    p = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []
    return rows[-1] if rows else {}


def _count_lines(path: Path) -> int:
    return sum(1 for x in path.read_text(encoding="utf-8").splitlines() if x.strip()) if path.is_file() else 0


# --- the stages ------------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, cfg: dict, out: str | Path, progress: bool = True, log=None):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.stages_dir = self.out / "stages"
        self.keys: dict[str, str] = {}
        self.rows: list[dict] = []

    # paths
    @property
    def corpus(self) -> Path:
        return self.out / "corpus"

    @property
    def final_run(self) -> Path:
        return self.out / ("dpo" if self.dpo_on else "sft")

    @property
    def dpo_on(self) -> bool:
        return bool(self.cfg["dpo"].get("enabled", True))

    def stage_key(self, name: str) -> str:
        c = self.cfg
        if name == "data":
            own = {"annotator": c["data"]["annotator"], "config": data_config(c),
                   "materials": materials_digest(c["personas"])}
        elif name == "sft":
            own = {"train": _train_dict(train_config(c, "sft")), "up": self.keys["data"]}
        elif name == "dpo":
            own = {"train": _train_dict(train_config(c, "dpo")), "up": [self.keys["data"], self.keys["sft"]]}
        elif name == "export":
            own = {"export": c["export"], "up": self.keys["dpo" if self.dpo_on else "sft"]}
        elif name == "eval":
            own = {"judge": c["eval"]["judge"], "config": eval_config(c),
                   "up": [self.keys["data"], self.keys["sft"], self.keys.get("dpo")]}
        else:
            own = {"up": [self.keys.get(s) for s in STAGES[:-1]]}
        return _hash({"stage": name, **own})

    def run(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "reproduce.yaml").write_text(yaml.safe_dump(self.cfg, sort_keys=False))
        t_all = time.perf_counter()
        for name in STAGES:
            if name == "dpo" and not self.dpo_on or name == "eval" and not self.cfg["eval"].get("enabled", True):
                self.rows.append({"stage": name, "status": "off", "seconds": 0.0, "figures": {}, "outputs": []})
                continue
            self.keys[name] = self.stage_key(name)
            self._stage(name)
        self.total_s = time.perf_counter() - t_all
        self._write_report()
        return self.rows

    def _stage(self, name: str) -> None:
        key = self.keys[name]
        done_p, started_p = self.stages_dir / f"{name}.json", self.stages_dir / f"{name}.started.json"
        done, started = _read_json(done_p), _read_json(started_p)
        if done and done.get("key") == key:
            why = check_record(done.get("files", {}), self.out) or getattr(self, f"_valid_{name}")(done)
            if why is None:
                self.log(f"[{name}] complete (key {key}); skipped")
                self.rows.append({"stage": name, "status": "skipped", **{k: done[k] for k in ("seconds", "figures", "outputs")}})
                return
            self.log(f"[{name}] marker found but outputs are not valid ({why}); redoing")
        fresh = not (started and started.get("key") == key)
        if started and fresh or done and done.get("key") != key:
            self.log(f"[{name}] settings or inputs changed since the last run: starting this stage over")
        elif started:
            self.log(f"[{name}] resuming an interrupted run")
        if done_p.exists():
            done_p.unlink()
        _write_json(started_p, {"key": key, "started": time.time()})
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        figures, outputs = getattr(self, f"_run_{name}")(fresh)
        seconds = round(time.perf_counter() - t0, 1)
        record = file_record([self.out / o for o in outputs], self.out)
        _write_json(done_p, {"key": key, "seconds": seconds, "figures": figures, "outputs": outputs, "files": record,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.log(f"[{name}] done in {seconds:.1f} s: {_fmt_figures(figures)}")
        self.rows.append({"stage": name, "status": "ran", "seconds": seconds, "figures": figures, "outputs": outputs})

    # data -------------------------------------------------------------------------------------------
    def _run_data(self, fresh: bool):
        from data_gen.errors import DataGenError
        from data_gen.pipeline import build

        d = self.cfg["data"]
        if fresh and self.corpus.exists():  # new settings: new corpus; the annotator cache (OUT/cache) is kept
            shutil.rmtree(self.corpus)
        try:
            m = build(self.cfg["personas"], str(self.corpus), d["annotator"], data_config(self.cfg),
                      base_url=d["base_url"], cache_dir=str(self.out / "cache"), progress=self.progress, echo=self.log)
        except DataGenError as e:
            raise ReproduceError(f"data build: {e}") from None
        failed = sum(v for k, v in m["rejected_by_reason"].items() if k.endswith("annotator_failed"))
        if failed:
            raise ReproduceError(f"data build: {failed} annotator requests failed after all retries; rerun the same "
                                 f"command to retry them (answered requests come from the cache)")
        t = m["totals"]
        if not t["sft_train"]:
            raise ReproduceError(f"data build: no training item survived ({m['rejected_by_reason']}); see "
                                 f"{self.corpus / 'manifest.json'}")
        if self.cfg["eval"].get("enabled", True) and not t["sft_test"]:
            raise ReproduceError("data build: the test split is empty, so there is nothing to evaluate on; raise "
                                 "data.config.split.test_fraction or set eval.enabled=false")
        if self.dpo_on and not t["dpo"]:
            raise ReproduceError("data build: no DPO pairs; set dpo.enabled=false or build more items")
        figures = {"train": t["sft_train"], "train_rows": t["sft_train_rows"], "test": t["sft_test"], "dpo_pairs": t["dpo"],
                   "rejected": t["rejected"], "requests_sent": m["requests"].get("sent", 0)}
        return figures, ["corpus/manifest.json", "corpus/sft", "corpus/dpo"]

    def _valid_data(self, done: dict) -> str | None:
        f = done["figures"]
        for rel, n in (("sft/train.jsonl", f["train_rows"]), ("sft/test.jsonl", f["test"]), ("dpo/train.jsonl", f["dpo_pairs"])):
            if _count_lines(self.corpus / rel) != n:
                return f"corpus/{rel} does not hold {n} rows"
        return None

    # sft / dpo --------------------------------------------------------------------------------------
    def _run_sft(self, fresh: bool):
        from persllm_jax.train.data import DataError
        from persllm_jax.model.lora import LoraError
        from persllm_jax.train.sharding import MeshError
        from persllm_jax.train.sft import run
        from persllm_jax.train.config import ConfigError
        from persllm_jax.model.weights import WeightsError

        run_dir = self.out / "sft"
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        cfg = train_config(self.cfg, "sft")
        cfg.data = str(self.corpus)
        try:
            run(cfg, run_dir, progress=self.progress, log=self.log)
        except (ConfigError, DataError, LoraError, MeshError, WeightsError, FileNotFoundError) as e:
            raise ReproduceError(f"sft: {str(e).splitlines()[0]}") from None
        return self._train_figures(run_dir), ["sft/run.json", "sft/config.yaml", "sft/metrics.jsonl"]

    def _run_dpo(self, fresh: bool):
        run_dir = self.out / "dpo"
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        cfg = train_config(self.cfg, "dpo")
        run_dpo(cfg, self.out / "sft", self.corpus, run_dir, progress=self.progress, log=self.log)
        return self._train_figures(run_dir), ["dpo/run.json", "dpo/config.yaml", "dpo/metrics.jsonl"]

    def _train_figures(self, run_dir: Path) -> dict:
        info = _read_json(run_dir / "run.json") or {}
        last = last_metrics(run_dir)
        fig = {"steps": info.get("total_steps"), "loss": _r(last.get("loss")), "tokens_per_s": _r(last.get("tokens_per_s"), 0)}
        for k in ("reward_accuracy", "reward_margin"):
            if k in last:
                fig[k] = _r(last[k])
        if latest_checkpoint(run_dir) != info.get("total_steps"):
            raise ReproduceError(f"{run_dir}: training ended without a checkpoint at step {info.get('total_steps')}")
        return fig

    def _valid_sft(self, done: dict) -> str | None:
        return self._valid_run(self.out / "sft", done)

    def _valid_dpo(self, done: dict) -> str | None:
        return self._valid_run(self.out / "dpo", done)

    @staticmethod
    def _valid_run(run_dir: Path, done: dict) -> str | None:
        step = latest_checkpoint(run_dir)
        if step != done["figures"].get("steps"):
            return f"{run_dir.name}: latest checkpoint is {step}, expected {done['figures'].get('steps')}"
        return None

    # export -----------------------------------------------------------------------------------------
    def _run_export(self, fresh: bool):
        from persllm_jax.export.driver import ExportError, export

        figures, outputs = {}, []
        for fmt in self.cfg["export"]["formats"]:
            out = self.out / "export" / fmt
            try:
                r = export(self.final_run, out, fmt, self.cfg["export"]["dtype"], overwrite=True, log=self.log)
            except ExportError as e:
                raise ReproduceError(f"export {fmt}: {str(e).splitlines()[0]}") from None
            ours = r.checks.get("export_vs_ours", {})
            size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
            figures[fmt] = {"MB": round(size / 1e6, 1), "max_logit_diff": float(f"{ours.get('max_abs_diff', float('nan')):.3g}")}
            outputs.append(f"export/{fmt}")
        return figures, outputs

    def _valid_export(self, done: dict) -> str | None:
        need = {"merged": ("config.json", "tokenizer_config.json"), "peft": ("adapter_config.json", "adapter_model.safetensors")}
        for fmt in self.cfg["export"]["formats"]:
            d = self.out / "export" / fmt
            for name in need[fmt]:
                if not (d / name).is_file():
                    return f"export/{fmt}/{name} is missing"
        return None

    # eval -------------------------------------------------------------------------------------------
    def _run_eval(self, fresh: bool):
        from persllm_jax.eval import EvalError
        from persllm_jax.eval.evaluate import evaluate

        out = self.out / "eval"
        if out.exists():  # eval has no partial state worth keeping (the judge cache is its own)
            shutil.rmtree(out)
        conf = self.stages_dir / "eval_config.yaml"
        conf.write_text(yaml.safe_dump(eval_config(self.cfg), sort_keys=False))
        runs = [f"SFT={self.out / 'sft'}"] + ([f"SFT+DPO={self.out / 'dpo'}"] if self.dpo_on else [])
        e = self.cfg["eval"]
        try:
            res = evaluate(self.cfg["model"], runs, str(self.corpus), str(out), judge=e["judge"], base_url=e["base_url"],
                           config=str(conf), personas_dir=self.cfg["personas"], log=self.log)
        except EvalError as err:
            raise ReproduceError(f"eval: {err}") from None
        return {name: headline(s) for name, s in res["systems"].items()}, ["eval/results.json", "eval/report.md"]

    def _valid_eval(self, done: dict) -> str | None:
        r = _read_json(self.out / "eval" / "results.json")
        if not r or set(r.get("systems", {})) != set(done["figures"]):
            return "eval/results.json does not hold the evaluated systems"
        return None

    # report -----------------------------------------------------------------------------------------
    def _run_report(self, fresh: bool):
        return {}, []  # written by _write_report after every run (it holds this run's times)

    def _valid_report(self, done: dict) -> str | None:
        return None

    def _write_report(self) -> None:
        lines = ["# PersLLM reproduction", "", f"Config: `{self.out / 'reproduce.yaml'}`", "",
                 "| stage | status | time (s) | key figures | outputs |", "|---|---|---|---|---|"]
        for r in self.rows:
            if r["stage"] == "report":
                continue
            outs = ", ".join(f"`{o}`" for o in r["outputs"])
            lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {_fmt_figures(r['figures'])} | {outs} |")
        ev = self.out / "eval" / "report.md"
        if ev.is_file():
            lines += ["", "## Evaluation (from eval/report.md)", "", ev.read_text(encoding="utf-8").split("\n", 1)[-1]]
        (self.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def headline(system: dict) -> dict:
    """A few comparable numbers per evaluated system for the summary table."""
    out = {}
    d = system.get("distinction") or {}
    avg = d.get("average") or {}
    for k in ("intra", "stage", "inter"):
        if isinstance(avg.get(k), (int, float)):
            out[f"bleu_{k}"] = _r(avg[k])
    ai = system.get("anti_induction") or {}
    if ai.get("break_rate_all") is not None:
        out["break_rate"] = _r(ai["break_rate_all"])
    if ai.get("refute_rate") is not None:
        out["refute_rate"] = _r(ai["refute_rate"])
    pr = (system.get("precision") or {}).get("overall") or {}
    if pr.get("mean") is not None:
        out["precision"] = _r(pr["mean"])
    bf = (system.get("bigfive") or {}).get("summary") or {}
    for k, name in (("dynamic_mean_l2", "big5_stage_change"), ("distinction_mean_l2", "big5_persona_distance")):
        if bf.get(k) is not None:
            out[name] = _r(bf[k])
    st = system.get("style") or {}
    if isinstance(st.get("own_minus_other_mean"), (int, float)):
        out["style_margin"] = _r(st["own_minus_other_mean"])
    return out


def _r(v, nd: int = 3):
    return None if v is None else round(float(v), nd)


def _train_dict(c) -> dict:
    import dataclasses

    d = dataclasses.asdict(c)
    for k in ("save_every", "keep_checkpoints", "log_every", "peak_tflops"):  # bookkeeping, not the model
        d.pop(k, None)
    return d


def _fmt_figures(f: dict) -> str:
    parts = []
    for k, v in f.items():
        parts.append(f"{k}: {_fmt_figures(v)}" if isinstance(v, dict) else f"{k}={v}")
    return "; ".join(parts) if any(isinstance(v, dict) for v in f.values()) else ", ".join(parts)


def run_dpo(cfg, sft_run: Path, corpus: Path, run_dir: Path, progress: bool = True, log=None) -> None:
    """The DPO trainer (persllm_jax/dpo.py): the SFT run merged into the base is the start and the reference."""
    from persllm_jax.train.data import DataError
    from persllm_jax.train.dpo import run
    from persllm_jax.export.driver import ExportError
    from persllm_jax.model.lora import LoraError
    from persllm_jax.train.sharding import MeshError
    from persllm_jax.train.config import ConfigError
    from persllm_jax.model.weights import WeightsError

    cfg.from_run, cfg.data = str(sft_run), str(corpus)
    try:
        run(cfg, run_dir, progress=progress, log=log or print)
    except (ConfigError, DataError, ExportError, LoraError, MeshError, WeightsError, FileNotFoundError) as e:
        raise ReproduceError(f"dpo: {str(e).splitlines()[0]}") from None


def summary_table(rows: list[dict], out: Path) -> str:
    head = ["stage", "status", "time", "key figures", "outputs"]
    body = []
    for r in rows:
        if r["stage"] == "report":
            r = {**r, "outputs": ["report.md"]}
        body.append([r["stage"], r["status"], f"{r['seconds']:.0f} s" if r["status"] != "off" else "",
                     _fmt_figures(r["figures"]), " ".join(str(out / o) for o in r["outputs"])])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head) - 1)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths] + ["-" * 7])] + [fmt(r) for r in body])


def preflight(cfg: dict, out: str | Path) -> list[str]:
    """What the run needs from outside the config (model weights, the general data, an API key), checked before
    the first stage and reported together, so a paper-scale run does not stop at the first gap hours in."""
    import os

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


def reproduce(config: str | Path | None, out: str | Path, sets=(), progress: bool = True, log=None) -> list[dict]:
    cfg = load(config, sets)
    problems = preflight(cfg, out)
    if problems:
        raise ReproduceError(f"{len(problems)} thing(s) missing before the run can start: " + "; ".join(problems))
    return Pipeline(cfg, out, progress=progress, log=log).run()


import click  # noqa: E402


@click.command("reproduce")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Output folder (default: runs/<config name>). Rerunning into it skips finished stages.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable), e.g. sft.steps=20, data.config.inputs.per_stage=2, model=DIR.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--print-config", "print_stage", type=click.Choice(["all", "data", "sft", "dpo", "eval"]), default=None,
              help="Print the resolved config (all, or one stage's, as the plain YAML its own command takes) and exit; "
                   "e.g. `--print-config sft > sft.yaml; persllm plan sft.yaml`.")
def reproduce_cmd(config, out, sets, no_progress, print_stage):
    """The whole PersLLM recipe: data build -> SFT -> DPO -> export (merged, PEFT) -> eval -> report.

    Each stage is skipped when its outputs are complete and valid for the current settings, and resumed when it
    was interrupted. configs/demo.yaml is the offline CPU demo; configs/paper_*.yaml the paper-scale recipes.
    """
    out = Path(out or Path("runs") / (Path(config).stem if config else "reproduce"))
    if print_stage:
        try:
            click.echo(yaml.safe_dump(stage_config(load(config, sets), print_stage), sort_keys=False), nl=False)
        except ReproduceError as e:
            raise click.ClickException(str(e).splitlines()[0]) from None
        return
    try:
        rows = reproduce(config, out, sets, progress=not no_progress)
    except ReproduceError as e:
        raise click.ClickException(str(e).splitlines()[0]) from None
    click.echo(summary_table(rows, out))
    click.echo(f"report: {out / 'report.md'}")


__all__ = ["reproduce_cmd", "reproduce", "load", "Pipeline", "ReproduceError", "summary_table", "STAGES", "DEFAULTS"]
