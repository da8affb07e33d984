"""The /rate judgements (SQLite, see persllm_jax/serve/web/rate.py) aggregated, and their report section
(`persllm eval human` runs `evaluate.human_eval`, which writes them beside an eval's report).

Per model pair and criterion: wins, losses, ties and a win rate in which a tie counts half a win for each side,
with a percentile bootstrap interval over judgements (numpy, fixed seed). Across models: Bradley-Terry strengths
fitted by Hunter's MM algorithm on the same half-win counts (a small symmetric pseudo-count keeps a model that
never won finite). Inter-rater agreement: on items (prompt, model pair) judged by two or more raters, Cohen's kappa
over every pair of those raters' outcomes, next to the raw agreement.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import numpy as np

from persllm_jax.errors import InputError
from persllm_jax.eval import EvalError
from persllm_jax.io import read_json

CRITERIA = ("fidelity", "knowledge", "style")
NAMES = {"fidelity": "persona fidelity", "knowledge": "knowledge", "style": "style"}


def load_judgements(db: str | Path) -> list[dict]:
    """Rows of the judgements table (read-only; the server may be writing)."""
    path = Path(db)
    if not path.is_file():
        raise EvalError(f"--db {db}: no such file")
    try:
        con = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=30)
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM judgements ORDER BY created, judgement_id")]
        con.close()
    except sqlite3.Error as e:
        raise EvalError(f"--db {db}: not a persllm rating database ({e})") from None
    return rows


def outcome(row: dict, criterion: str) -> tuple[str, str, float]:
    """(first, second, score of first) with the pair in sorted order: 1 first won, 0 second won, 0.5 tie.
    The shown order (A/B) is undone here: A is row['model_a'] whatever side it came from."""
    a, b, c = row["model_a"], row["model_b"], row[criterion]
    s_a = {"A": 1.0, "B": 0.0, "tie": 0.5}[c]
    return (a, b, s_a) if a < b else (b, a, 1.0 - s_a)


def win_rates(rows: list[dict], criteria=CRITERIA, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """{criterion: {"X vs Y": {first, second, n, wins, losses, ties, win_rate, ci}}}; win_rate is the first
    model's (ties count half), ci a percentile bootstrap interval over the pair's judgements."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in criteria:
        scores: dict[tuple, list] = {}
        for r in rows:
            x, y, s = outcome(r, c)
            scores.setdefault((x, y), []).append(s)
        res = {}
        for (x, y), s in sorted(scores.items()):
            s = np.asarray(s)
            boot = s[rng.integers(0, len(s), size=(n_boot, len(s)))].mean(axis=1)
            lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
            res[f"{x} vs {y}"] = {"first": x, "second": y, "n": int(len(s)), "wins": int((s == 1).sum()),
                                  "losses": int((s == 0).sum()), "ties": int((s == 0.5).sum()),
                                  "win_rate": float(s.mean()), "ci": [float(lo), float(hi)]}
        out[c] = res
    return out


def bradley_terry(rows: list[dict], criterion: str, prior: float = 0.1, iters: int = 2000, tol: float = 1e-10) -> dict:
    """{model: log-strength} (mean 0; higher is better) by Hunter's MM algorithm; a tie is half a win each way
    and every compared pair gets `prior` pseudo-wins each way."""
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    if len(models) < 2:
        return {m: 0.0 for m in models}
    idx = {m: i for i, m in enumerate(models)}
    k = len(models)
    w = np.zeros((k, k))  # w[i, j]: wins of i over j (ties half)
    for r in rows:
        x, y, s = outcome(r, criterion)
        w[idx[x], idx[y]] += s
        w[idx[y], idx[x]] += 1 - s
    games = w + w.T
    w = w + prior * (games > 0)
    n = w + w.T
    p = np.ones(k)
    for _ in range(iters):
        denom = (n / (p[:, None] + p[None, :])).sum(axis=1)
        new = w.sum(axis=1) / np.maximum(denom, 1e-300)
        new = new / np.exp(np.mean(np.log(np.maximum(new, 1e-300))))
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    logp = np.log(np.maximum(p, 1e-300))
    return {m: float(logp[idx[m]] - logp.mean()) for m in models}


def cohen_kappa(pairs: list[tuple[str, str]], labels=("first", "second", "tie")) -> float | None:
    """Cohen's kappa of (rater 1 label, rater 2 label) pairs; None without pairs or when chance agreement is 1."""
    if not pairs:
        return None
    n = len(pairs)
    po = sum(a == b for a, b in pairs) / n
    pe = sum((sum(a == l for a, _ in pairs) / n) * (sum(b == l for _, b in pairs) / n) for l in labels)
    if pe >= 1:
        return None
    return (po - pe) / (1 - pe)


def agreement(rows: list[dict], criteria=CRITERIA) -> dict:
    """Inter-rater agreement on items (prompt, model pair) that two or more raters judged: for every such item
    and every pair of its raters (ordered by rater id), both outcomes in the pair's sorted order."""
    items: dict[tuple, dict] = {}
    for r in rows:
        x, y, _ = outcome(r, criteria[0])
        items.setdefault((r["prompt_id"], x, y), {}).setdefault(r["rater_id"], r)  # a rater's first judgement
    shared = {k: v for k, v in items.items() if len(v) >= 2}
    out = {"items": len(shared), "raters": len({rt for v in shared.values() for rt in v})}
    label = {1.0: "first", 0.0: "second", 0.5: "tie"}
    for c in criteria:
        pairs = []
        for v in shared.values():
            for r1, r2 in itertools.combinations(sorted(v), 2):
                pairs.append((label[outcome(v[r1], c)[2]], label[outcome(v[r2], c)[2]]))
        out[c] = {"pairs": len(pairs), "kappa": cohen_kappa(pairs),
                  "percent_agreement": (sum(a == b for a, b in pairs) / len(pairs)) if pairs else None}
    return out


def summarize(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    if not rows:
        raise EvalError("no judgements in the database yet")
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    return {"n_judgements": len(rows), "raters": len({r["rater_id"] for r in rows}),
            "prompts": len({r["prompt_id"] for r in rows}), "models": models,
            "ties": "a tie counts half a win for each model (win rates and Bradley-Terry)",
            "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95},
            "win_rates": win_rates(rows, n_boot=n_boot, seed=seed),
            "bradley_terry": {c: bradley_terry(rows, c) for c in CRITERIA},
            "agreement": agreement(rows)}


def markdown(h: dict, plot: str | None = "human.png") -> str:
    """The report section."""
    md = ["## Human evaluation (blind pairwise, /rate)\n",
          f"{h['n_judgements']} judgements by {h['raters']} rater(s) on {h['prompts']} prompt(s); models: "
          f"{', '.join(f'`{m}`' for m in h['models'])}. Win rate of the first model of each pair, a tie counting "
          f"half; 95% bootstrap interval ({h['bootstrap']['resamples']} resamples).\n",
          "| criterion | pair | n | wins / losses / ties | win rate [95% CI] |", "|---|---|---|---|---|"]
    for c, pairs in h["win_rates"].items():
        for k, v in pairs.items():
            md.append(f"| {NAMES.get(c, c)} | {k} | {v['n']} | {v['wins']} / {v['losses']} / {v['ties']} | "
                      f"{v['win_rate']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] |")
    md += ["", "Bradley-Terry log-strength (mean 0; higher is preferred):\n",
           "| model | " + " | ".join(NAMES.get(c, c) for c in h["bradley_terry"]) + " |",
           "|---|" + "---|" * len(h["bradley_terry"])]
    for m in sorted(h["models"], key=lambda m: -h["bradley_terry"]["fidelity"].get(m, 0.0)):
        md.append(f"| {m} | " + " | ".join(f"{h['bradley_terry'][c].get(m, 0.0):+.2f}" for c in h["bradley_terry"]) + " |")
    a = h["agreement"]
    md.append("")
    if a["items"]:
        md.append(f"Inter-rater agreement on {a['items']} item(s) judged by two or more of {a['raters']} raters: " +
                  "; ".join(f"{NAMES.get(c, c)} κ = {_number(a[c]['kappa'])} ({_number(a[c]['percent_agreement'])} agree, "
                            f"{a[c]['pairs']} rater pairs)" for c in CRITERIA) + ".")
    else:
        md.append("Inter-rater agreement: no item was judged by two raters yet.")
    if plot:
        md.append(f"\n![human evaluation]({plot})\n")
    return "\n".join(md) + "\n"


def _number(v):
    return "–" if v is None else f"{v:.2f}"


def section(out_dir: Path) -> tuple[str, list[str]] | None:
    """(markdown, plots) of OUT/human.json for the eval report, or None when there is none."""
    p = Path(out_dir) / "human.json"
    if not p.is_file():
        return None
    try:
        h = read_json(p)
        has_plot = (Path(out_dir) / "human.png").is_file()
        return markdown(h, "human.png" if has_plot else None), (["human.png"] if has_plot else [])
    except (InputError, KeyError, TypeError):
        return None


__all__ = ["CRITERIA", "NAMES", "load_judgements", "win_rates", "bradley_terry", "agreement", "cohen_kappa",
           "summarize", "markdown", "section"]
