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

May import anything below cli/: data_gen, train/, export/, eval/, runs, settings, io, errors.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

from persllm_jax.errors import PersllmError
from persllm_jax.io import atomic_write_json, atomic_write_text, read_json
from persllm_jax.outputs import MARKER, check_output, mark
from persllm_jax.pipeline.config import (
    STAGES,
    ReproduceError,
    data_config,
    eval_config,
    load,
    preflight,
    train_config,
)
from persllm_jax.pipeline.report import format_figures, headline, rounded, write_report
from persllm_jax.runs import last_metrics, latest_step
from persllm_jax.settings import dump, to_dict

# --- stage bookkeeping -----------------------------------------------------------------------------


def _hash(obj) -> str:
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_marker(path: Path) -> dict | None:
    try:
        return read_json(path)
    except PersllmError:
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
            own = {"train": _train_settings(train_config(c, "sft")), "up": self.keys["data"]}
        elif name == "dpo":
            own = {"train": _train_settings(train_config(c, "dpo")), "up": [self.keys["data"], self.keys["sft"]]}
        elif name == "export":
            own = {"export": c["export"], "up": self.keys["dpo" if self.dpo_on else "sft"]}
        elif name == "eval":
            own = {"judge": c["eval"]["judge"], "config": eval_config(c),
                   "up": [self.keys["data"], self.keys["sft"], self.keys.get("dpo")]}
        else:
            own = {"up": [self.keys.get(s) for s in STAGES[:-1]]}
        return _hash({"stage": name, **own})

    def run(self) -> list[dict]:
        check_output(self.out, [self.cfg["personas"], self.cfg["model"]])
        ours = any((self.out / n).exists() for n in (MARKER, "reproduce.yaml", "stages"))
        if self.out.is_dir() and any(self.out.iterdir()) and not ours:
            raise ReproduceError(f"--out {self.out} is not empty and not a reproduce folder; choose another --out")
        mark(self.out, "reproduce")
        atomic_write_text(self.out / "reproduce.yaml", dump(self.cfg))
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
        done, started = _read_marker(done_p), _read_marker(started_p)
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
        atomic_write_json(started_p, {"key": key, "started": time.time()})
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        figures, outputs = getattr(self, f"_run_{name}")(fresh)
        seconds = round(time.perf_counter() - t0, 1)
        record = file_record([self.out / o for o in outputs], self.out)
        atomic_write_json(done_p, {"key": key, "seconds": seconds, "figures": figures, "outputs": outputs, "files": record,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.log(f"[{name}] done in {seconds:.1f} s: {format_figures(figures)}")
        self.rows.append({"stage": name, "status": "ran", "seconds": seconds, "figures": figures, "outputs": outputs})

    # data -------------------------------------------------------------------------------------------
    def _run_data(self, fresh: bool):
        from data_gen.pipeline import build, failure_message

        d = self.cfg["data"]
        if fresh and self.corpus.exists():  # new settings: new corpus; the annotator cache (OUT/cache) is kept
            shutil.rmtree(self.corpus)
        try:
            m = build(self.cfg["personas"], str(self.corpus), d["annotator"], data_config(self.cfg),
                      base_url=d["base_url"], cache_dir=str(self.out / "cache"), progress=self.progress, echo=self.log)
        except PersllmError as e:
            raise ReproduceError(f"data build: {e}") from None
        problem = failure_message(m)
        if problem:
            raise ReproduceError(f"data build: {problem}; see {self.corpus / 'manifest.json'}")
        t = m["totals"]
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
        from persllm_jax.train.sft import run

        run_dir = self.out / "sft"
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        cfg = train_config(self.cfg, "sft")
        cfg.data = str(self.corpus)
        try:
            run(cfg, run_dir, progress=self.progress, log=self.log)
        except PersllmError as e:
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
        info = _read_marker(run_dir / "run.json") or {}
        last = last_metrics(run_dir)
        fig = {"steps": info.get("total_steps"), "loss": rounded(last.get("loss")), "tokens_per_s": rounded(last.get("tokens_per_s"), 0)}
        for k in ("reward_accuracy", "reward_margin"):
            if k in last:
                fig[k] = rounded(last[k])
        if latest_step(run_dir) != info.get("total_steps"):
            raise ReproduceError(f"{run_dir}: training ended without a checkpoint at step {info.get('total_steps')}")
        return fig

    def _valid_sft(self, done: dict) -> str | None:
        return self._valid_run(self.out / "sft", done)

    def _valid_dpo(self, done: dict) -> str | None:
        return self._valid_run(self.out / "dpo", done)

    @staticmethod
    def _valid_run(run_dir: Path, done: dict) -> str | None:
        step = latest_step(run_dir)
        if step != done["figures"].get("steps"):
            return f"{run_dir.name}: latest checkpoint is {step}, expected {done['figures'].get('steps')}"
        return None

    # export -----------------------------------------------------------------------------------------
    def _run_export(self, fresh: bool):
        from persllm_jax.export.driver import export

        figures, outputs = {}, []
        for fmt in self.cfg["export"]["formats"]:
            out = self.out / "export" / fmt
            try:
                r = export(self.final_run, out, fmt, self.cfg["export"]["dtype"], overwrite=True, log=self.log)
            except PersllmError as e:
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
        from persllm_jax.eval.evaluate import evaluate

        out = self.out / "eval"
        if out.exists():  # eval has no partial state worth keeping (the judge cache is its own)
            shutil.rmtree(out)
        conf = self.stages_dir / "eval_config.yaml"
        atomic_write_text(conf, dump(eval_config(self.cfg)))
        runs = [f"SFT={self.out / 'sft'}"] + ([f"SFT+DPO={self.out / 'dpo'}"] if self.dpo_on else [])
        e = self.cfg["eval"]
        try:
            res = evaluate(self.cfg["model"], runs, str(self.corpus), str(out), judge=e["judge"], base_url=e["base_url"],
                           config=str(conf), personas_dir=self.cfg["personas"], log=self.log, progress=self.progress)
        except PersllmError as err:
            raise ReproduceError(f"eval: {err}") from None
        return {name: headline(s) for name, s in res["systems"].items()}, ["eval/results.json", "eval/report.md"]

    def _valid_eval(self, done: dict) -> str | None:
        r = _read_marker(self.out / "eval" / "results.json")
        if not r or set(r.get("systems", {})) != set(done["figures"]):
            return "eval/results.json does not hold the evaluated systems"
        return None

    # report -----------------------------------------------------------------------------------------
    def _run_report(self, fresh: bool):
        return {}, []  # written by _write_report after every run (it holds this run's times)

    def _valid_report(self, done: dict) -> str | None:
        return None

    def _write_report(self) -> None:
        write_report(self.out, self.rows)


def _train_settings(c) -> dict:
    """A training config as the stage key sees it: bookkeeping keys (not the model) left out."""
    d = to_dict(c)
    for k in ("save_every", "keep_checkpoints", "log_every", "peak_tflops", "report_to"):
        d.pop(k, None)
    if not d.get("eval_every"):  # eval off: the keys of runs made before eval_every existed stay as they were
        for k in ("eval_every", "eval_data", "eval_fraction"):
            d.pop(k, None)
    return d


def run_dpo(cfg, sft_run: Path, corpus: Path, run_dir: Path, progress: bool = True, log=None) -> None:
    """The DPO trainer (train/dpo.py): the SFT run merged into the base is the start and the reference."""
    from persllm_jax.train.dpo import run

    cfg.from_run, cfg.data = str(sft_run), str(corpus)
    try:
        run(cfg, run_dir, progress=progress, log=log or print)
    except PersllmError as e:
        raise ReproduceError(f"dpo: {str(e).splitlines()[0]}") from None


def reproduce(config: str | Path | None, out: str | Path, sets=(), progress: bool = True, log=None) -> list[dict]:
    cfg = load(config, sets)
    problems = preflight(cfg, out)
    if problems:
        raise ReproduceError(f"{len(problems)} thing(s) missing before the run can start: " + "; ".join(problems))
    return Pipeline(cfg, out, progress=progress, log=log).run()


__all__ = ["reproduce", "Pipeline", "run_dpo", "materials_digest"]
