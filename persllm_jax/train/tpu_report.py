"""The TPU plan's roofline and report, from the worker's result (tpu_plan.py):

    step_s = max(HLO flops / peak bf16 FLOP/s, HLO bytes accessed / HBM bandwidth)      (per chip)
    tokens/s = batch_size x grad_accum x max_length / step_s
    MFU = tokens/s x model FLOPs per token / (chips x peak)

The roofline is a bound (perfect overlap, no collectives' latency): real steps are slower.
"""

from __future__ import annotations

import dataclasses

from persllm_jax.train.plan import GiB, format_suggestions, gib, suggestions
from persllm_jax.train.tpu_plan import TARGETS, Target


def roofline(stage: dict, target: Target) -> dict:
    c = stage["cost"]
    t_flops, t_bytes = c["flops"] / target.peak_flops, c["bytes"] / target.hbm_bw
    step_s = max(t_flops, t_bytes)
    tps = stage["tokens_per_step"] / step_s if step_s > 0 else 0.0
    return {"compute_s": t_flops, "memory_s": t_bytes, "step_s": step_s, "bound": "compute" if t_flops >= t_bytes
            else "memory", "tokens_per_s": tps,
            "mfu": tps * stage["flops_per_token"] / (target.chips * target.peak_flops),
            "hlo_over_model_flops": c["flops"] * target.chips / (stage["flops_per_token"] * stage["tokens_per_step"])}


def _cost_lines(c: dict | None, r: dict | None, target: Target, skipped: bool = False) -> list[str]:
    if skipped:
        return ["  roofline not computed (--no-roofline: memory only)"]
    if c is None:
        return ["  roofline n/a: the unrolled costs-only compile exceeds the chip's HBM even at one row per chip"]
    scaled = (f" (scaled from one row per chip x {c['scaled_from_one_row']}: the unrolled compile of a whole "
              f"micro-step exceeds HBM)" if c.get("scaled_from_one_row") else
              f" (one micro-step x {c['scale']})" if c.get("scale", 1) > 1 else "")
    return [f"  per chip per step: {c['flops'] / 1e12:.2f} TFLOP (HLO; {r['hlo_over_model_flops']:.2f}x the model "
            f"FLOPs), {c['bytes'] / 1e9:.1f} GB accessed{scaled}",
            f"  roofline: step = max({c['flops'] / 1e12:.2f} TFLOP / {target.peak_flops / 1e12:.0f} TFLOP/s, "
            f"{c['bytes'] / 1e9:.1f} GB / {target.hbm_bw / 1e9:.0f} GB/s) = max({r['compute_s']:.3f}, "
            f"{r['memory_s']:.3f}) = {r['step_s']:.3f} s ({r['bound']}-bound)",
            f"  predicted (upper bound): {r['tokens_per_s']:,.0f} tokens/s on {target.chips} chips, MFU "
            f"{100 * r['mfu']:.0f}%"]


def stage_report(s: dict, name: str, target: Target, headroom: float) -> tuple[list[str], bool]:
    usable = headroom * target.hbm
    mesh = " x ".join(f"{k}={v}" for k, v in s["mesh"].items())
    head = (f"[{s['stage']}] batch {s['batch_size']} x {s['max_length']} tokens ({s['micro_rows_per_device']} rows "
            f"per chip per micro-step), grad_accum {s['grad_accum']}, compute {s['dtype']}, remat "
            f"{'on' if s['remat'] else 'off'}, {'LoRA' if s['lora'] else 'full fine-tuning'}, mesh {mesh}")
    b = s["bytes"]
    if not s["fits_compiler"]:
        o = s["oom"]
        need = f"{o['needed'] / GiB:.2f} GiB" if "needed" in o else "more"
        return [head, f"  weights {gib(b['weights']).strip()}, optimizer state {gib(b['optimizer']).strip()} per chip",
                f"  the TPU compiler refuses it: {o['message']}",
                f"  DOES NOT FIT: needs {need} per chip on {name}"], False
    r = roofline(s, target) if s["cost"] else None
    fits = b["peak"] <= usable
    c = s["cost"]
    mm = s["matmuls"]
    lines = [head, "  per chip (TPU compiler's memory analysis):",
             f"    weights          {gib(b['weights'])}", f"    optimizer state  {gib(b['optimizer'])}",
             f"    batch            {gib(b['batch'])}",
             f"    activations      {gib(b['activations'])}   (saved for the backward pass)",
             f"    temporaries      {gib(b['temporaries'])}",
             f"    peak             {gib(b['peak'])}   of {target.hbm / GiB:.0f} GiB ({100 * b['peak'] / target.hbm:.0f}%;"
             f" limit {100 * headroom:.0f}% = {usable / GiB:.1f} GiB)",
             *_cost_lines(c, r, target, s.get("cost_skipped", False)),
             f"  matmuls in the compiled HLO: {mm['bf16_fraction'] * 100:.0f}% of their FLOPs in bf16 ("
             + ", ".join(f"{k} {100 * v / max(sum(mm['by_dtype'].values()), 1):.0f}%" for k, v in mm["by_dtype"].items())
             + ")",
             f"  compiled in {s['compile_s']:.0f} s",
             f"  {'FITS' if fits else 'DOES NOT FIT'}: {b['peak'] / GiB:.2f} GiB per chip {'<=' if fits else '>'} "
             f"{usable / GiB:.1f} GiB"]
    return lines, fits


def report(result: dict, headroom: float) -> tuple[str, bool]:
    name = result["target"]
    t = TARGETS[name]
    lines = [f"target      {name}: {t.chips} x {result['device_kind']} ({t.topology}), {t.hbm / GiB:.0f} GiB HBM, "
             f"{t.peak_flops / 1e12:.0f} bf16 TFLOP/s, {t.hbm_bw / 1e9:.0f} GB/s per chip ({t.source})",
             f"compiler    TPU (libtpu {result['libtpu']}, jax {result['jax']}), deviceless ahead-of-time"]
    first = next(iter(result["stages"].values()))
    lines.append(f"model       {first['model']}: {first['n_params'] / 1e9:.2f}B params")
    ok = True
    for s in result["stages"].values():
        more, fits = stage_report(s, name, t, headroom)
        lines += more
        ok &= fits
    return "\n".join(lines), ok


def with_roofline(result: dict) -> dict:
    t = TARGETS[result["target"]]
    out = {**result, "target_spec": dataclasses.asdict(t), "stages": {}}
    for k, s in result["stages"].items():
        out["stages"][k] = {**s, "roofline": roofline(s, t)} if s["fits_compiler"] and s["cost"] else s
    return out



def failing_stages(result: dict, headroom: float) -> list[str]:
    cap = TARGETS[result["target"]].hbm
    return [k for k, s in result["stages"].items() if not s["fits_compiler"] or s["bytes"]["peak"] > headroom * cap]


def refusal(result: dict, cfgs: dict, headroom: float, what: str) -> str:
    """The one-paragraph refusal for a plan that does not fit: the first failing step's bytes and fixes to try."""
    name = result["target"]
    target, bad = TARGETS[name], failing_stages(result, headroom)
    s = result["stages"][bad[0]]
    need = s["bytes"]["peak"] if s["fits_compiler"] else s["oom"].get("needed", float("nan"))
    plan_like = {**s, "bytes": {"activations": None, **s["bytes"]}}
    fixes = format_suggestions(suggestions(cfgs[bad[0]], plan_like, target.chips))
    return (f"{what}: the {'/'.join(bad)} step needs {need / GiB:.2f} GiB per chip, more than "
            f"{headroom * target.hbm / GiB:.1f} GiB on {name} (TPU compiler). Try:\n{fixes}")


__all__ = ["roofline", "stage_report", "report", "with_roofline", "failing_stages", "refusal"]
