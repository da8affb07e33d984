"""`persllm data build`: runs the steps in order and writes the corpus folder.

    CORPUS_DIR/work/        state.json, chunks.jsonl, plan.jsonl, inputs.jsonl, responses.jsonl,
                            cross_temporal.jsonl (resumable step files)
    CORPUS_DIR/cache/       annotator responses keyed by request hash (unless --cache-dir)
    CORPUS_DIR/sft/train.jsonl, sft/test.jsonl, dpo/train.jsonl, manifest.json
    CORPUS_DIR/probes.jsonl, controls.jsonl   point-in-time probes and premise controls (data_gen/probes.py)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

from data_gen import annotate, dpo_pairs, mixing, probes, split
from data_gen.backends import make_backend
from data_gen.classify import classify_unsorted
from data_gen.config import fingerprint
from data_gen.errors import DataGenError
from data_gen.materials import chunk_persona, load_personas
from data_gen.prompts import Templates, format_cot
from data_gen.retrieval import Index
from persllm_jax.io import atomic_replace, atomic_write_text, write_jsonl
from persllm_jax.outputs import MARKER, check_output, mark


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


class Ctx:
    def __init__(self, cfg: dict, personas, out: Path, backend, progress: bool):
        self.cfg, self.out, self.backend = cfg, out, backend
        self.personas = {p.key: p for p in personas}
        self.work = out / "work"
        self.chunks = []
        self.chunk_by_id = {}
        self._templates: dict = {}
        self._indexes: dict = {}
        self._progress = progress
        self.classified: dict = {}

    def chunks_of(self, persona: str, stage: str, kind: str):
        return [c for c in self.chunks if c.persona == persona and c.stage == stage and c.kind == kind]

    def templates(self, p) -> Templates:
        if p.language not in self._templates:
            self._templates[p.language] = Templates(p.language, self.cfg["templates"]["dir"])
        return self._templates[p.language]

    def index(self, persona: str, stage: str, kind: str) -> Index:
        k = (persona, stage, kind)
        if k not in self._indexes:
            texts = [c.text for c in self.chunks_of(*k)]
            emb = None
            if self.cfg["retrieval"]["method"] == "dense":  # paragraph embeddings cached in work/emb/
                import numpy as np

                from data_gen.retrieval import Embedder

                tag = hashlib.sha256(json.dumps([self.cfg["retrieval"]["model"], texts]).encode()).hexdigest()[:16]
                path = self.work / "emb" / f"{'__'.join(k)}.{tag}.npy"
                if path.exists():
                    emb = np.load(path, allow_pickle=False)
                else:
                    emb = Embedder.get(self.cfg["retrieval"]["model"]).encode(texts)
                    def write(tmp, emb=emb):
                        with open(tmp, "wb") as f:
                            np.save(f, emb, allow_pickle=False)

                    atomic_replace(path, write)
            self._indexes[k] = Index(texts, self.cfg["retrieval"], embeddings=emb)
        return self._indexes[k]

    def progress(self, desc: str, total: int, initial: int = 0):
        if not self._progress:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=f"{desc:>15}", unit="item", file=sys.stderr,
                    dynamic_ncols=True)

    def system_message(self, persona: str, stage: str) -> dict | None:
        if not self.cfg["sft"]["system"]:
            return None
        p = self.personas[persona]
        s = p.stage(stage)
        text = self.templates(p).render("sft_system.j2", name=p.name, description=p.description, label=s.label,
                                        stage_description=s.description)
        return {"role": "system", "content": text}

    def prompt_messages(self, row: dict) -> list[dict]:
        sys_msg = self.system_message(row["persona"], row["stage"])
        return ([sys_msg] if sys_msg else []) + [{"role": "user", "content": row["input"]}]


def _check_state(ctx: Ctx, restart: bool, materials_digest: str) -> None:
    state_path = ctx.work / "state.json"
    want = {"fingerprint": fingerprint(ctx.cfg), "materials": materials_digest,
            "annotator": ctx.backend.identity.get("model")}
    if state_path.exists() and not restart:
        have = json.loads(state_path.read_text(encoding="utf-8"))
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise DataGenError(f"{ctx.out}: was built with other {', '.join(diff)}; use another --out, or "
                               f"--restart to redo its work/ files (cached answers are reused, not re-sent)")
    if restart and ctx.work.exists():
        for f in ctx.work.glob("*.jsonl"):
            f.unlink()
    atomic_write_text(state_path, json.dumps(want, indent=1))


def build(personas_dir: str, out_dir: str, annotator: str, cfg: dict, base_url: str | None = None,
          cache_dir: str | None = None, restart: bool = False, progress: bool = True, echo=print) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name, t0):
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)

    # -- everything that can fail on bad input is checked before anything is written --------------
    t0 = time.perf_counter()
    personas = load_personas(Path(personas_dir))
    chunks = [c for p in personas for c in chunk_persona(p, int(cfg["chunk"]["max_words"]))]
    for p in personas:
        t = Templates(p.language, cfg["templates"]["dir"])
        if any(c.kind == "unsorted" and c.persona == p.key for c in chunks) and "classify.j2" not in t.compiled:
            raise DataGenError(f"{p.path}: has unsorted/ materials but no classify.j2 template for language "
                               f"'{p.language}' (give one with --set templates.dir=DIR)")
    general = mixing.load_general(cfg["mix"]["general"], cfg["mix"]["general_max"]) if cfg["mix"]["general"] else []
    out = Path(out_dir)
    check_output(out, [personas_dir, cfg["mix"]["general"], cfg["templates"]["dir"]])
    corpus_like = (MARKER, "manifest.json", "work", "sft", "dpo")  # ours, or a corpus from before the marker
    if out.is_dir() and any(out.iterdir()) and not any((out / n).exists() for n in corpus_like):
        raise DataGenError(f"--out {out} is not empty and not a corpus folder; choose another --out")
    backend = make_backend(annotator, base_url, cfg["annotator"], Path(cache_dir) if cache_dir else out / "cache")
    ctx = Ctx(cfg, personas, out, backend, progress)
    ctx.chunks, ctx.chunk_by_id = chunks, {c.id: c for c in chunks}
    digest = hashlib.sha256(json.dumps([dataclasses.astuple(c) for c in chunks]).encode()).hexdigest()[:16]
    ctx.work.mkdir(parents=True, exist_ok=True)
    mark(out, "data build")
    _check_state(ctx, restart, digest)
    t1 = time.perf_counter()
    chunks, ctx.classified = classify_unsorted(ctx, chunks)
    ctx.chunks, ctx.chunk_by_id = chunks, {c.id: c for c in chunks}
    if ctx.classified:
        timed("classify", t1)
    write_jsonl(ctx.work / "chunks.jsonl", [dataclasses.asdict(c) for c in chunks])
    timed("chunk", t0)

    t0 = time.perf_counter()
    for p in personas:  # build the indexes up front (dense: embeds every paragraph once)
        for s in p.stages:
            for kind in ("objective", "subjective"):
                ctx.index(p.key, s.id, kind)
    timed("index", t0)

    items = annotate.plan(ctx)
    write_jsonl(ctx.work / "plan.jsonl", items)

    t0 = time.perf_counter()
    inputs, responses = annotate.inputs_and_responses(ctx, items)
    timed("inputs_responses", t0)

    # -- assemble items, dedup, split --------------------------------------------------------------
    rejected: list[dict] = []
    good: list[dict] = []
    for it in items:
        i = inputs.get(it["id"])
        if i is None or i.get("reason"):
            rejected.append({"id": it["id"], "step": "inputs", "reason": (i or {}).get("reason", "missing"),
                             **({"error": i["error"]} if i and i.get("error") else {})})
            continue
        r = responses.get(it["id"])
        if r is None or r.get("reason"):
            rejected.append({"id": it["id"], "step": "responses", "reason": (r or {}).get("reason", "missing"),
                             **({"error": r["error"]} if r and r.get("error") else {})})
            continue
        good.append(dict(it, input=i["input"], analysis=r["analysis"], response=r["response"],
                         target=format_cot(r["analysis"], r["response"])))
    t0 = time.perf_counter()
    kept, dropped = split.dedup(good, cfg)
    for d in dropped:
        rejected.append({"id": d["id"], "step": "dedup", "reason": "near_duplicate", "duplicate_of": d["duplicate_of"]})
    train, test = split.split(kept, cfg)
    timed("dedup_split", t0)

    def sft_row(r):
        return {"id": r["id"], "persona": r["persona"], "stage": r["stage"], "type": r["type"],
                "messages": ctx.prompt_messages(r) + [{"role": "assistant", "content": r["target"]}]}

    # -- DPO ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    pairs, dpo_missing = [], {}
    if cfg["dpo"]["cross_temporal"]:
        answers = annotate.cross_temporal_step(ctx, train)
        ct, miss = dpo_pairs.cross_temporal_pairs(ctx, train, answers)
        pairs += ct
        dpo_missing["cross_temporal"] = miss
    timed("cross_temporal", t0)
    t0 = time.perf_counter()
    if cfg["dpo"]["cross_persona"]:
        cp, miss = dpo_pairs.cross_persona_pairs(ctx, train, kept)
        pairs += cp
        dpo_missing["cross_persona"] = miss
    timed("cross_persona", t0)

    # -- write ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    train_rows, n_general = mixing.mix([sft_row(r) for r in train], general, cfg)
    write_jsonl(out / "sft" / "train.jsonl", train_rows)
    write_jsonl(out / "sft" / "test.jsonl", [sft_row(r) for r in test])
    write_jsonl(out / "dpo" / "train.jsonl", sorted(pairs, key=lambda r: r["id"]))
    timed("write", t0)
    t0 = time.perf_counter()
    probe_stats = probes.corpus_step(ctx, test)  # probes.jsonl, controls.jsonl
    timed("probes", t0)

    steps = {"inputs_ok": [it for it in items if (inputs.get(it["id"]) or {}).get("input")],
             "responses_ok": [it for it in items if (responses.get(it["id"]) or {}).get("response")],
             "dedup_kept": kept}
    manifest = _manifest(ctx, items, rejected, train, test, pairs, dpo_missing, n_general, len(train_rows),
                         timings, time.perf_counter() - t_start, steps)
    previous = []
    if (out / "manifest.json").exists() and not restart:
        try:
            previous = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("runs", [])
        except ValueError:
            previous = []
    manifest["probes"] = probe_stats
    manifest["complete"] = failure_message(manifest) is None
    manifest["runs"] = previous + [{"created": manifest["created"], "requests": manifest["requests"],
                                    "total_s": manifest["timings_s"]["total"]}]
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    echo(summary_table(manifest))
    return manifest


def _manifest(ctx, items, rejected, train, test, pairs, dpo_missing, n_general, n_train_rows, timings, total,
              steps):
    counts: dict = {}
    names = ("planned", "inputs_ok", "responses_ok", "dedup_kept", "rejected", "train", "test", "dpo")
    for p in ctx.personas.values():
        counts[p.key] = {s.id: {k: Counter() for k in names} for s in p.stages}
    for it in items:
        counts[it["persona"]][it["stage"]]["planned"][it["type"]] += 1
    for name, rows in steps.items():
        for it in rows:
            counts[it["persona"]][it["stage"]][name][it["type"]] += 1
    by_id = {it["id"]: it for it in items}
    for r in rejected:
        it = by_id[r["id"]]
        counts[it["persona"]][it["stage"]]["rejected"][f"{r['step']}:{r['reason']}"] += 1
    for name, rows in (("train", train), ("test", test)):
        for r in rows:
            counts[r["persona"]][r["stage"]][name][r["type"]] += 1
    for r in pairs:
        counts[r["persona"]][r["stage"]]["dpo"][r["source"]] += 1
    counts = {p: {s: {k: dict(sorted(v.items())) for k, v in d.items()} for s, d in st.items()}
              for p, st in counts.items()}
    reasons = Counter(f"{r['step']}:{r['reason']}" for r in rejected)
    cfg = json.loads(json.dumps(ctx.cfg, default=str))
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "annotator": ctx.backend.identity,
        "config": cfg,
        "personas": {p.key: {"name": p.name, "language": p.language,
                             "stages": [dataclasses.asdict(s) for s in p.stages]} for p in ctx.personas.values()},
        "classified": ctx.classified,
        "totals": {"chunks": len(ctx.chunks), "planned": len(items), "rejected": len(rejected),
                   "sft_train": len(train), "sft_test": len(test), "sft_train_rows": n_train_rows,
                   "general_rows": n_general, "dpo": len(pairs),
                   "dpo_by_source": dict(Counter(r["source"] for r in pairs))},
        "counts": counts,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejected": rejected,
        "dpo_not_paired": dpo_missing,
        "requests": dict(sorted(ctx.backend.stats.items())),
        "annotator_errors": dict(ctx.backend.last_error),  # endpoint -> why its last failed request failed
        "complete": None,  # set by build: False when requests failed after every retry, or nothing was kept
        "timings_s": {**timings, "total": round(total, 3)},
    }


def failed_requests(rejected_by_reason) -> int:
    """Items whose annotator request failed after every retry (a rerun of the build retries them)."""
    return sum(v for k, v in rejected_by_reason.items() if k.endswith("annotator_failed"))


def failure_message(m: dict) -> str | None:
    """Why a finished build is not usable as it is, worded for the user (None: it is)."""
    failed = failed_requests(m["rejected_by_reason"])
    failed += m.get("probes", {}).get("rejected_by_reason", {}).get("annotator_failed", 0)  # the probes step's
    errors = "; ".join(f"last error from {url}: {why}" for url, why in m.get("annotator_errors", {}).items())
    if failed:
        return (f"{failed} annotator requests failed after all retries ({errors or 'no error recorded'}); rerun the "
                f"same command to retry them (answered requests come from the cache)")
    if not m["totals"]["sft_train"]:
        return f"no training item survived (rejected: {m['rejected_by_reason'] or 'none'})"
    return None


def summary_table(m: dict) -> str:
    head = ["persona", "stage", "planned", "ordinary", "thought", "error", "rejected", "train", "test", "dpo"]
    rows = []
    for p, stages in m["counts"].items():
        for s, c in stages.items():
            kept = Counter(c["train"]) + Counter(c["test"])
            rows.append([p, s, sum(c["planned"].values()), kept["ordinary"], kept["thought"], kept["error"],
                         sum(c["rejected"].values()), sum(c["train"].values()), sum(c["test"].values()),
                         sum(c["dpo"].values())])
    t = m["totals"]
    rows.append(["total", "", t["planned"], "", "", "", t["rejected"], t["sft_train"], t["sft_test"], t["dpo"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    req = m["requests"]
    lines.append(f"requests: {req.get('sent', 0)} sent, {req.get('cache_hits', 0)} from cache, "
                 f"{sum(v for k, v in req.items() if k.startswith('retry_'))} retries, {req.get('failed', 0)} failed; "
                 f"rejected: {', '.join(f'{k} {v}' for k, v in m['rejected_by_reason'].items()) or 'none'}; "
                 f"{m['timings_s']['total']:.1f} s")
    return "\n".join(lines)
