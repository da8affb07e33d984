"""report.md and PNG plots from results.json: Big Five radar per persona and stage, the distinction table,
precision bars, anti-induction and style, training curves from each run's metrics.jsonl. Several systems (base
with a persona prompt, SFT, SFT+DPO) appear side by side, as the paper presents its results."""

from __future__ import annotations

from pathlib import Path

from persllm_jax.eval import human
from persllm_jax.eval.plots import bars, radar, training_curves
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
            ("style own − other personas", lambda s: (s.get("style") or {}).get("own_minus_other_mean"))]
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


def safe_name(name: str) -> str:
    """A system name as a file name part (answers_<name>.jsonl, bigfive_<name>.png)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
