"""report.md and PNG plots from results.json: Big Five radar per persona and stage, the distinction table,
precision bars, anti-induction and style, point-in-time consistency (per kind, leakage matrix, premise
calibration), training curves from each run's metrics.jsonl. Several systems (base with a persona prompt, SFT,
SFT+DPO) appear side by side, as the paper presents its results."""

from __future__ import annotations

from pathlib import Path

from data_gen.probes import TIME_KINDS
from persllm_jax.eval import human
from persllm_jax.eval.plots import bars, radar, timeline, training_curves
from persllm_jax.io import atomic_write_text


def _fmt(v, nd=2):
    return "–" if v is None else f"{v:.{nd}f}"


def write(results: dict, out: Path) -> list[str]:
    """Writes the plots and report.md into `out`; returns the PNG names."""
    out = Path(out)
    systems = results["systems"]
    names = list(systems)
    pngs: list[str] = []
    md = ["# Persona evaluation\n", f"Corpus: `{results['data']}` — {results['n_test_items']} test items, "
          f"{results['settings']['samples']} sample(s) each; systems: {', '.join(f'`{n}`' for n in names)}.",
          f"Judge: {results.get('judge') or 'none (judge metrics skipped)'}.\n"]

    # summary table
    md += ["## Summary\n", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [("distinction BLEU intra", lambda s: s["distinction"]["average"]["intra"]),
            ("distinction BLEU stage", lambda s: s["distinction"]["average"]["stage"]),
            ("distinction BLEU inter (lower = more distinct)", lambda s: s["distinction"]["average"]["inter"]),
            ("intra − stage", lambda s: s["distinction"]["average"]["intra_minus_stage"]),
            ("knowledge precision (0-5)", lambda s: (s.get("precision") or {}).get("knowledge", {}).get("mean")),
            ("attitude precision (0-5)", lambda s: (s.get("precision") or {}).get("attitude", {}).get("mean")),
            ("precision, both (0-5)", lambda s: (s.get("precision") or {}).get("overall", {}).get("mean")),
            ("anti-induction refute rate", lambda s: (s.get("anti_induction") or {}).get("refute_rate")),
            ("character-break rate (all items)", lambda s: (s.get("anti_induction") or {}).get("break_rate_all")),
            ("Big Five consistency: mean std across variants (lower = steadier)",
             lambda s: ((s.get("bigfive") or {}).get("summary") or {}).get("consistency_mean_std")),
            ("Big Five dynamic development: mean L2 between stages",
             lambda s: ((s.get("bigfive") or {}).get("summary") or {}).get("dynamic_mean_l2")),
            ("Big Five distinction: mean L2 between personas",
             lambda s: ((s.get("bigfive") or {}).get("summary") or {}).get("distinction_mean_l2")),
            ("style cosine to own words", lambda s: (s.get("style") or {}).get("own_mean")),
            ("style own − other personas", lambda s: (s.get("style") or {}).get("own_minus_other_mean")),
            ("point-in-time accuracy, judge-free", lambda s: s["timeline"]["free"]["overall"]["accuracy"]),
            ("point-in-time future accuracy, judge-free",
             lambda s: s["timeline"]["free"]["per_kind"]["future"]["accuracy"]),
            ("point-in-time future contrast, judge-free (0.5 = stage ignored)",
             lambda s: s["timeline"]["free"]["contrasts"]["future"]["accuracy"]),
            ("premise calibration (refute vs over-refusal)", lambda s: s["timeline"]["free"]["premise"]["calibration"])]
    for label, value_of in rows:
        vals = []
        for n in names:
            try:
                vals.append(_fmt(value_of(systems[n]), 3))
            except (KeyError, TypeError):
                vals.append("–")
        md.append(f"| {label} | " + " | ".join(vals) + " |")

    # distinction table as in the paper
    md += ["\n## Distinction (sentence BLEU, sacrebleu)\n",
           "Intra: answers of the same persona and stage; Stage: between the persona's stages; Inter: against the "
           "other personas (mean over them).\n",
           "| persona | " + " | ".join(f"{k} ({n})" for n in names for k in ("intra", "stage", "inter")) + " |",
           "|---|" + "---|" * (3 * len(names))]
    personas = sorted({p for n in names for p in systems[n]["distinction"]["per_persona"]})
    for p in personas + ["**average**"]:
        cells = []
        for n in names:
            d = systems[n]["distinction"]["average"] if p.startswith("**") else systems[n]["distinction"]["per_persona"].get(p, {})
            cells += [_fmt(d.get(k)) for k in ("intra", "stage", "inter")]
        md.append(f"| {p} | " + " | ".join(cells) + " |")
    bars({n: {k: systems[n]["distinction"]["average"][k] for k in ("intra", "stage", "inter")} for n in names},
         "Distinction (BLEU, average over personas)", "BLEU", out / "distinction.png")
    pngs.append("distinction.png")
    md.append("\n![distinction](distinction.png)\n")

    # precision
    if any(systems[n].get("precision") for n in names):
        md += ["## Precision (LLM judge, 0-5 against the reference)\n",
               "| system | knowledge (n) | attitude (n) | both (n) | neither | unparsable class / score | failed requests |",
               "|---|---|---|---|---|---|---|"]
        for n in names:
            pr = systems[n].get("precision")
            if not pr:
                continue
            c = lambda k: f"{_fmt(pr[k]['mean'])} ({pr[k]['n']})"  # noqa: E731
            md.append(f"| {n} | {c('knowledge')} | {c('attitude')} | {c('overall')} | {pr['neither']} | "
                      f"{pr['unparsable_class']} / {pr['unparsable_score']} | {pr.get('failed_requests', 0)} |")
        md += ["", "By persona and stage (both classes, weighted by item count):\n",
               "| persona/stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        keys = sorted({k for n in names for k in ((systems[n].get("precision") or {}).get("overall", {}).get("by_stage") or {})})
        for k in keys:
            md.append(f"| {k} | " + " | ".join(_fmt(((systems[n].get("precision") or {}).get("overall", {}).get("by_stage") or {})
                                                    .get(k, {}).get("mean")) for n in names) + " |")
        md += ["", "By input type:\n", "| type | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        types = sorted({k for n in names for k in ((systems[n].get("precision") or {}).get("overall", {}).get("by_type") or {})})
        for k in types:
            md.append(f"| {k} | " + " | ".join(_fmt(((systems[n].get("precision") or {}).get("overall", {}).get("by_type") or {})
                                                    .get(k, {}).get("mean")) for n in names) + " |")
        bars({n: {k: (systems[n].get("precision") or {}).get(k, {}).get("mean") for k in ("knowledge", "attitude", "overall")}
              for n in names}, "Precision (judge score 0-5)", "score", out / "precision.png", ylim=(0, 5))
        pngs.append("precision.png")
        md.append("\n![precision](precision.png)\n")

    # anti-induction
    md += ["## Anti-induction\n", "| system | error items | refute rate (judge) | unparsable | break rate (error items) | break rate (all) |",
           "|---|---|---|---|---|---|"]
    for n in names:
        a = systems[n].get("anti_induction") or {}
        md.append(f"| {n} | {a.get('n_error', 0)} | {_fmt(a.get('refute_rate'))} | {a.get('unparsable', '–')} | "
                  f"{_fmt(a.get('break_rate_error'))} | {_fmt(a.get('break_rate_all'))} |")

    # Big Five
    if any(systems[n].get("bigfive") for n in names):
        md += ["\n## Big Five (IPIP-50, scored by option likelihood; 1-5)\n"]
        for n in names:
            bf = systems[n].get("bigfive")
            if not bf:
                continue
            md += [f"### {n}\n", f"Variants: {', '.join(bf['variants'])}; items: {bf['n_items']}.\n",
                   "| persona/stage | " + " | ".join(bf["traits"]) + " | spread across variants |",
                   "|---|" + "---|" * (len(bf["traits"]) + 1)]
            for p in sorted(bf["profiles"]):
                for s in sorted(bf["profiles"][p]):
                    md.append(f"| {p}/{s} | " + " | ".join(_fmt(bf["profiles"][p][s][t]) for t in bf["traits"]) +
                              f" | {_fmt(bf['consistency'][p][s]['mean_std'], 3)} |")
            for p, ch in sorted(bf["dynamic"].items()):
                for k, d in ch.items():
                    md.append(f"\n{p} {k}: " + ", ".join(f"{t} {d['per_trait'][t]:+.2f}" for t in bf["traits"]) +
                              f" (L2 {d['l2']:.3f})")
            if bf["distance"]:
                md.append("\nPersona distances (L2): " + ", ".join(f"{k} {v:.3f}" for k, v in bf["distance"].items()))
            fn = f"bigfive_{safe_name(n)}.png"
            radar(bf, n, out / fn)
            pngs.append(fn)
            md.append(f"\n![Big Five {n}]({fn})\n")

    # style
    if any(systems[n].get("style") for n in names):
        md += ["## Style similarity (embedding cosine to the persona's own words)\n",
               "| persona/stage | " + " | ".join(f"{n} own / own−other" for n in names) + " |", "|---|" + "---|" * len(names)]
        keys = sorted({k for n in names for k in ((systems[n].get("style") or {}).get("by_stage") or {})})
        for k in keys:
            cells = []
            for n in names:
                v = ((systems[n].get("style") or {}).get("by_stage") or {}).get(k, {})
                cells.append(f"{_fmt(v.get('own'), 3)} / {_fmt(v.get('own_minus_other'), 3)}")
            md.append(f"| {k} | " + " | ".join(cells) + " |")
    elif results.get("notes", {}).get("style"):
        md.append(f"\nStyle similarity skipped: {results['notes']['style']}\n")

    timeline_md, timeline_pngs = timeline_section(results, out)
    md += timeline_md
    pngs += timeline_pngs

    runs = {n: systems[n]["run_dir"] for n in names if systems[n].get("run_dir")}
    if runs and training_curves(runs, out / "training_curves.png"):
        pngs.append("training_curves.png")
        md += ["\n## Training curves\n", "![training curves](training_curves.png)\n"]

    ratings = human.section(out)  # written by `persllm eval human --out` into this directory
    if ratings:
        md += ["", ratings[0]]
        pngs += ratings[1]

    md += ["\n## Samples\n"]
    for n in names:
        for a in systems[n].get("examples", [])[:3]:
            md.append(f"- **{n}** · {a['persona']}/{a['stage']} · {a['type']} — Q: {a['question'][:200]!r} → "
                      f"A: {a['text'][:300]!r}")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return pngs


def _accuracy_cell(acc: dict | None) -> str:
    """"0.75 [0.50, 1.00] (n=8)": accuracy, its bootstrap interval and the number of probes."""
    if not acc or acc["accuracy"] is None:
        return "–"
    lo, hi = acc["ci95"] or (None, None)
    return f"{acc['accuracy']:.2f} [{_fmt(lo)}, {_fmt(hi)}] (n={acc['n']})"


def timeline_section(results: dict, out: Path) -> tuple[list[str], list[str]]:
    """Markdown lines and PNG names of "Point-in-time consistency" (eval/timeline.py's results)."""
    systems = {n: s["timeline"] for n, s in results["systems"].items() if s.get("timeline")}
    if not systems:
        return [], []
    tl = results.get("timeline") or {}
    kinds = list(TIME_KINDS)
    md = ["\n## Point-in-time consistency (TimeChara kinds)\n",
          "Probe sets: " + "; ".join(f"`{s['path']}` ({s['format']}, {s['n']} probes, "
                                     f"{', '.join(f'{k} {v}' for k, v in s['origins'].items())})"
                                     for s in tl.get("sources", [])) + ".\n",
          "Judge-free: a probe is right when the model's log-likelihood (mean per token) of the consistent answer, "
          "under the asked stage's system message, beats every inconsistent one. Bracketed: 95% bootstrap interval.\n",
          "| system | " + " | ".join(kinds) + " | all |", "|---|" + "---|" * (len(kinds) + 1)]
    for n, t in systems.items():
        pk = t["free"]["per_kind"]
        md.append(f"| {n} | " + " | ".join(_accuracy_cell(pk.get(k)) for k in kinds) +
                  f" | {_accuracy_cell(t['free']['overall'])} |")
    if any(t["free"].get("contrasts") for t in systems.values()):
        md += ["", "Stage contrasts (judge-free, prior-free: the same question and answers in two conditions, so "
               "the answers' own likelihood cancels; 0.5 = the stage makes no difference). future: the model affirms "
               "a fact more at or after its stage than before it; presence: it claims presence more for events the "
               "persona took part in than for those it did not (same stage). n = pairs.\n",
               "| system | future contrast | presence contrast |", "|---|---|---|"]
        for n, t in systems.items():
            c = t["free"].get("contrasts") or {}
            md.append(f"| {n} | {_accuracy_cell(c.get('future'))} | {_accuracy_cell(c.get('presence'))} |")
    if any(t.get("judged") for t in systems.values()):
        md += ["", "Judged (the free answer, judged 0/1 for spatiotemporal consistency; TimeChara's protocol):\n",
               "| system | " + " | ".join(kinds) + " | all | unparsable | failed |", "|---|" + "---|" * (len(kinds) + 3)]
        for n, t in systems.items():
            j = t.get("judged")
            if not j:
                continue
            md.append(f"| {n} | " + " | ".join(f"{_fmt(j['per_kind'].get(k, {}).get('accuracy'))} (n={j['per_kind'].get(k, {}).get('n', 0)})"
                                              for k in kinds) +
                      f" | {_fmt(j['overall']['accuracy'])} | {j['unparsable']} | {j['failed']} |")
    md += ["", "Leakage matrix (judge-free, knowledge probes): share of probes where the model claims to know the "
           "fact, by stage asked (rows) and stage of the fact (columns). Consistent: 1 on and below the diagonal, "
           "0 above it.\n"]
    for n, t in systems.items():
        lk = t["free"]["leakage"]
        st = lk["stages"]
        if not st or len(st) > 12:
            md.append(f"- {n}: {'no knowledge probes' if not st else f'{len(st)} stages, see results.json'}")
            continue
        md += [f"**{n}**\n", "| asked \\ fact | " + " | ".join(st) + " |", "|---|" + "---|" * len(st)]
        for a in st:
            row = lk["cells"].get(a, {})
            md.append(f"| {a} | " + " | ".join(f"{row[f]['claims']:.2f} (n={row[f]['n']})" if f in row else "–"
                                                for f in st) + " |")
        md.append("")
    pr = {n: t["free"]["premise"] for n, t in systems.items()}
    if any(p["n_control"] or p["n_error"] for p in pr.values()):
        md += ["Premise calibration (judge-free): refute rate on false-premise `error` items, over-refusal on their "
               "matched true-premise controls; calibration = (refute + 1 − over-refusal) / 2.\n",
               "| system | refute rate (n) | over-refusal (n) | calibration | judged refute | judged over-refusal |",
               "|---|---|---|---|---|---|"]
        for n, p in pr.items():
            jp = (systems[n].get("judged") or {}).get("premise") or {}
            md.append(f"| {n} | {_fmt(p['refute_rate'])} ({p['n_error']}) | {_fmt(p['over_refusal_rate'])} "
                      f"({p['n_control']}) | {_fmt(p['calibration'])} | {_fmt(jp.get('refute_rate'))} | "
                      f"{_fmt(jp.get('over_refusal_rate'))} |")
    timeline(systems, kinds, out / "timeline.png")
    md.append("\n![point-in-time consistency](timeline.png)\n")
    return md, ["timeline.png"]


def safe_name(name: str) -> str:
    """A system name as a file name part (answers_<name>.jsonl, bigfive_<name>.png)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
