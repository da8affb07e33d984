"""The reproduce report: the stage table (terminal and OUT/report.md) and a few headline figures per evaluated
system."""

from __future__ import annotations

from pathlib import Path


def headline(system: dict) -> dict:
    """A few comparable numbers per evaluated system for the summary table."""
    out = {}
    d = system.get("distinction") or {}
    avg = d.get("average") or {}
    for k in ("intra", "stage", "inter"):
        if isinstance(avg.get(k), (int, float)):
            out[f"bleu_{k}"] = rounded(avg[k])
    ai = system.get("anti_induction") or {}
    if ai.get("break_rate_all") is not None:
        out["break_rate"] = rounded(ai["break_rate_all"])
    if ai.get("refute_rate") is not None:
        out["refute_rate"] = rounded(ai["refute_rate"])
    pr = (system.get("precision") or {}).get("overall") or {}
    if pr.get("mean") is not None:
        out["precision"] = rounded(pr["mean"])
    bf = (system.get("bigfive") or {}).get("summary") or {}
    for k, name in (("dynamic_mean_l2", "big5_stage_change"), ("distinction_mean_l2", "big5_persona_distance")):
        if bf.get(k) is not None:
            out[name] = rounded(bf[k])
    st = system.get("style") or {}
    if isinstance(st.get("own_minus_other_mean"), (int, float)):
        out["style_margin"] = rounded(st["own_minus_other_mean"])
    return out


def rounded(v, nd: int = 3):
    return None if v is None else round(float(v), nd)


def format_figures(f: dict) -> str:
    parts = []
    for k, v in f.items():
        parts.append(f"{k}: {format_figures(v)}" if isinstance(v, dict) else f"{k}={v}")
    return "; ".join(parts) if any(isinstance(v, dict) for v in f.values()) else ", ".join(parts)


def summary_table(rows: list[dict], out: Path) -> str:
    head = ["stage", "status", "time", "key figures", "outputs"]
    body = []
    for r in rows:
        if r["stage"] == "report":
            r = {**r, "outputs": ["report.md"]}
        body.append([r["stage"], r["status"], f"{r['seconds']:.0f} s" if r["status"] != "off" else "",
                     format_figures(r["figures"]), " ".join(str(out / o) for o in r["outputs"])])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head) - 1)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths] + ["-" * 7])] + [fmt(r) for r in body])


def write_report(out: Path, rows: list[dict]) -> None:
    """OUT/report.md: the stage table, then the eval report (when there is one)."""
    lines = ["# PersLLM reproduction", "", f"Config: `{out / 'reproduce.yaml'}`", "",
             "| stage | status | time (s) | key figures | outputs |", "|---|---|---|---|---|"]
    for r in rows:
        if r["stage"] == "report":
            continue
        outs = ", ".join(f"`{o}`" for o in r["outputs"])
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {format_figures(r['figures'])} | {outs} |")
    ev = out / "eval" / "report.md"
    if ev.is_file():
        lines += ["", "## Evaluation (from eval/report.md)", "", ev.read_text(encoding="utf-8").split("\n", 1)[-1]]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
