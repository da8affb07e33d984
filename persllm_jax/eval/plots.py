"""Every figure of the eval report, as PNG files: Big Five radar, grouped bars (distinction, precision), training
curves (and `persllm plot RUN_DIR`'s loss / eval_loss / lr panels), human ratings, point-in-time consistency. matplotlib is imported on first use, headless (Agg)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from persllm_jax.errors import InputError
from persllm_jax.runs import read_metrics


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported on first use: eval without plots needs none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def radar(bigfive: dict, title: str, path: Path) -> None:
    """Big Five profiles: one polar panel per persona, one line per stage."""
    plt = pyplot()
    traits = bigfive["traits"]
    personas = sorted(bigfive["profiles"])
    angles = np.linspace(0, 2 * np.pi, len(traits), endpoint=False).tolist()
    fig, axes = plt.subplots(1, len(personas), subplot_kw={"polar": True}, figsize=(4.2 * len(personas), 4.4), squeeze=False)
    for ax, p in zip(axes[0], personas):
        for s, prof in sorted(bigfive["profiles"][p].items()):
            vals = [prof[t] for t in traits]
            ax.plot(angles + angles[:1], vals + vals[:1], label=s)
            ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.12)
        ax.set_xticks(angles)
        ax.set_xticklabels([t.split("/")[0] for t in traits], fontsize=8)
        ax.set_ylim(1, 5)
        ax.set_yticks([2, 3, 4, 5])
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(p, fontsize=10)
        ax.legend(loc="lower right", fontsize=7, bbox_to_anchor=(1.25, -0.1))
    fig.suptitle(f"Big Five (IPIP-50, option likelihood): {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bars(groups: dict[str, dict[str, float | None]], title: str, ylabel: str, path: Path, ylim=None) -> None:
    """groups: {system: {metric: value}} -> grouped bars, one group per metric."""
    plt = pyplot()
    systems = list(groups)
    metrics = list(dict.fromkeys(m for g in groups.values() for m in g))
    x = np.arange(len(metrics))
    w = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(metrics) * max(1, len(systems)) / 2 + 3), 3.8))
    for i, s in enumerate(systems):
        vals = [groups[s].get(m) for m in metrics]
        ax.bar(x + i * w - 0.4 + w / 2, [0 if v is None else v for v in vals], w, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, fontsize=8, rotation=20)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def timeline(systems: dict, kinds: list[str], path: Path) -> None:
    """Point-in-time consistency: judge-free accuracy per kind (one bar per system), then each system's leakage
    matrix (share of probes where it claims to know the fact, stage asked x stage of the fact)."""
    plt = pyplot()
    names = list(systems)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.6 + 3.0 * len(names), 3.6), squeeze=False)
    ax = axes[0][0]
    w = 0.8 / max(1, len(names))
    x = np.arange(len(kinds))
    for i, n in enumerate(names):
        vals = [(systems[n]["free"]["per_kind"].get(k) or {}).get("accuracy") for k in kinds]
        ax.bar(x + i * w - 0.4 + w / 2, [0 if v is None else v for v in vals], w, label=n)
    ax.set_xticks(x)
    ax.set_xticklabels(kinds, fontsize=7, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("judge-free accuracy")
    ax.legend(fontsize=7)
    for ax, n in zip(axes[0][1:], names):
        lk = systems[n]["free"]["leakage"]
        st = lk["stages"][:12]
        m = np.full((len(st), len(st)), np.nan)
        for i, a in enumerate(st):
            for j, f in enumerate(st):
                if f in lk["cells"].get(a, {}):
                    m[i, j] = lk["cells"][a][f]["claims"]
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(st)))
        ax.set_xticklabels(st, fontsize=7)
        ax.set_yticks(range(len(st)))
        ax.set_yticklabels(st, fontsize=7)
        for i in range(len(st)):
            for j in range(len(st)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if m[i, j] < 0.5 else "k")
        ax.set_xlabel("stage of the fact")
        ax.set_ylabel("stage asked")
        ax.set_title(f"claims to know: {n}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def training_curves(runs: dict[str, str], path: Path) -> bool:
    """Training loss per step of each run (RUN_DIR/metrics.jsonl); False (no file written) when none has any."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for name, run_dir in runs.items():
        try:
            rows = read_metrics(run_dir)  # a torn last line of a running job is dropped
        except InputError as e:  # a damaged log costs its curve, not the report
            print(f"eval report: no training curve for {name}: {e}", file=sys.stderr)
            continue
        pts = [(row["step"], row["loss"]) for row in rows if "step" in row and "loss" in row]
        if pts:
            ax.plot(*zip(*pts), label=name)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


# one figure per panel of `persllm plot`: (file stem, title, [(metric, label)]); a panel with no data is skipped
RUN_PANELS = (("loss", "Loss", [("loss", "train"), ("eval_loss", "held out")]),
              ("lr", "Learning rate", [("lr", "lr")]),
              ("reward_accuracy", "Reward accuracy (DPO)", [("reward_accuracy", "train"),
                                                            ("eval_reward_accuracy", "held out")]))


def run_curves(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """RUN_DIR/metrics.jsonl drawn as OUT_DIR/{loss,lr,reward_accuracy}.png (train loss with the held-out
    eval_loss, the learning rate, DPO's reward accuracy); the files written. No rows: an InputError."""
    rows = read_metrics(run_dir)
    if not any("loss" in r for r in rows):
        raise InputError(f"{Path(run_dir) / 'metrics.jsonl'}: no training metrics to plot")
    plt, out_dir, written = pyplot(), Path(out_dir), []
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, title, series in RUN_PANELS:
        lines = [(label, [(r["step"], r[key]) for r in rows if key in r and "step" in r]) for key, label in series]
        lines = [(label, pts) for label, pts in lines if pts]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, pts in lines:
            ax.plot(*zip(*pts), label=label, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(f"{title}: {Path(run_dir).name}")
        if len(lines) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def human_ratings(h: dict, path: Path, names: dict[str, str] | None = None) -> None:
    """Human ratings (`human.summarize`): win rates with intervals per pair and criterion, and Bradley-Terry
    strengths per model. `names`: display names of the criteria."""
    names = names or {}
    plt = pyplot()
    crits = list(h["win_rates"])
    pairs = sorted({k for c in crits for k in h["win_rates"][c]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    wdt = 0.8 / len(crits)
    for i, c in enumerate(crits):
        xs = np.arange(len(pairs)) + i * wdt - 0.4 + wdt / 2
        vals = [h["win_rates"][c].get(p) for p in pairs]
        mid = [v["win_rate"] if v else 0 for v in vals]
        err = np.array([[v["win_rate"] - v["ci"][0], v["ci"][1] - v["win_rate"]] if v else [0, 0] for v in vals]).T
        ax1.bar(xs, mid, wdt, yerr=err, capsize=3, label=names.get(c, c))
    ax1.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax1.set_xticks(np.arange(len(pairs)))
    ax1.set_xticklabels(pairs, fontsize=8, rotation=15)
    ax1.set_ylim(0, 1.22)  # room above the bars for the legend
    ax1.set_yticks(np.linspace(0, 1, 6))
    ax1.set_ylabel("win rate of the first model")
    ax1.set_title("Pairwise win rates (95% bootstrap CI)")
    ax1.legend(fontsize=8, ncol=len(crits), loc="upper center")
    models = h["models"]
    for i, c in enumerate(crits):
        xs = np.arange(len(models)) + i * wdt - 0.4 + wdt / 2
        ax2.bar(xs, [h["bradley_terry"][c].get(m, 0.0) for m in models], wdt, label=names.get(c, c))
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_xticks(np.arange(len(models)))
    ax2.set_xticklabels(models, fontsize=8)
    ax2.set_title("Bradley-Terry log-strength")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


__all__ = ["pyplot", "radar", "bars", "training_curves", "run_curves", "human_ratings"]
