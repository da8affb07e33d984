"""Plan every paper recipe that targets a TPU with both compilers and print the markdown table of docs/scale.md.

    python tools/plan_recipes.py [--out DIR] [RECIPE ...]     (default: configs/paper_*_tpu-*.yaml)

Per recipe and stage: the CPU-emulated plan's peak per device (`persllm plan --devices N --device-kind ...`) next
to the TPU compiler's (`persllm plan --target tpu-...`), the TPU roofline's tokens/s and MFU, and the verdict. The
recipes name local checkpoints; they are planned on the named shape of the same architecture (no weights are read).
Each TPU compile takes minutes on a 2-core machine; the JSON of every plan is kept in --out.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"3b": "shape:llama-3b", "8b": "shape:llama-8b"}
CPU_KIND = {"tpu-v5e-8": ("tpu-v5e", 8), "tpu-v4-8": ("tpu-v4", 4)}
GiB = 2 ** 30


def plan(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "persllm_jax", "plan", *args, "--json"], capture_output=True, text=True,
                          cwd=REPO)
    text = proc.stdout
    if not text.strip().startswith("{"):
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(text[: text.rindex("}") + 1])


def rows(recipe: Path, out: Path) -> list[str]:
    m = re.match(r"paper_(\w+)_(tpu-[\w-]+)\.yaml", recipe.name)
    size, target = m.group(1), m.group(2)
    model = SHAPE[size]
    tpu = plan([str(recipe), "--model", model, "--target", target])
    kind, n = CPU_KIND[target]
    cpu = plan([str(recipe), "--model", model, "--devices", str(n), "--device-kind", kind])
    (out / f"{recipe.stem}.tpu.json").write_text(json.dumps(tpu, indent=1))
    (out / f"{recipe.stem}.cpu.json").write_text(json.dumps(cpu, indent=1))
    lines = []
    for stage, s in tpu.get("stages", {}).items():
        b = s["bytes"]
        cpu_peak = cpu["bytes"]["peak"] / GiB if stage == "sft" and "bytes" in cpu else None
        if s["fits_compiler"]:
            r = s.get("roofline")
            tpu_txt = f"{b['peak'] / GiB:.2f}"
            perf = f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.0f}%" if r else "n/a | n/a"
            if r and s["cost"].get("scaled_from_one_row"):
                perf = perf.replace(" |", "* |", 1)
        else:
            tpu_txt, perf = "refused", "- | -"
        limit = 0.9 * tpu["target_spec"]["hbm"] / GiB
        fits = s["fits_compiler"] and b["peak"] / GiB <= limit
        shape = f"{s['batch_size']}x{s['grad_accum']}x{s['max_length']}"
        lora = "LoRA" if s["lora"] else "full"
        lines.append(f"| {recipe.name} | {stage} | {lora}, {shape}, mesh fsdp {s['mesh']['fsdp']} | "
                     f"{'-' if cpu_peak is None else f'{cpu_peak:.2f}'} | {tpu_txt} | {limit:.1f} | {perf} | "
                     f"{'fits' if fits else 'DOES NOT FIT'} |")
    if "error" in tpu:
        lines.append(f"| {recipe.name} | - | - | - | error: {tpu['error']} | - | - | - |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=Path("plans"))
    a = ap.parse_args()
    recipes = a.recipes or sorted((REPO / "configs").glob("paper_*_tpu-*.yaml"))
    a.out.mkdir(parents=True, exist_ok=True)
    print("| recipe | stage | training | CPU-emulated peak (GiB/chip) | TPU compiler peak (GiB/chip) | limit | "
          "roofline tokens/s | MFU | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in recipes:
        for line in rows(r, a.out):
            print(line, flush=True)


if __name__ == "__main__":
    main()
