"""Export figures on the embedded SmolLM2-135M-Instruct: an SFT adapter (r=8, all projections) and an SFT -> DPO
chain (DPO r=4 on attention) exported merged (fp32, bf16) and as PEFT (fp32, bf16); each reloaded in transformers /
PEFT (torch, CPU) and compared with our JAX model on the export's probe prompts. Prints one JSON object.

    python tools/bench_export.py [--work DIR]

Needs the test extras (torch, peft). The adapters are random (B ~ N(0, 0.02)), sized like a trained adapter's;
export fidelity does not depend on what the adapter learned.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import torch
    from export_runs import hf_logits, random_adapter, write_run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persllm_jax import runs
    from persllm_jax.export import driver, verify
    from persllm_jax.model.weights import (
        embedded_model_path,
        gguf_cache_dir,
        load_model,
        load_tokenizer,
    )

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-export-"))
    shutil.rmtree(work, ignore_errors=True)
    base = load_model("smollm2")
    base_hf_dir = gguf_cache_dir(embedded_model_path())  # our dequantized base as an HF dir (PEFT's base)
    sft = write_run(work / "sft", "smollm2", random_adapter(base.cfg, 8, seed=1, b_std=0.02), alpha=16.0)
    dpo = write_run(work / "dpo", "smollm2", random_adapter(base.cfg, 4, ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                            seed=2, b_std=0.02), alpha=8.0, parent=sft)
    tok = load_tokenizer("smollm2")
    batch = verify.probe_batch(tok, base.cfg)
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "probe_tokens": int(batch["segment_ids"].sum()),
               "runs": {}}
    for name, run in (("sft", sft), ("sft+dpo", dpo)):
        ours = verify.our_model_logits(runs.load_chain(run), batch)
        for fmt, dtype in (("merged", "float32"), ("merged", "bfloat16"), ("peft", "float32"), ("peft", "bfloat16")):
            out = work / f"{name}-{fmt}-{dtype}"
            t = time.perf_counter()
            r = driver.export(run, out, fmt, dtype, log=lambda s: None)
            wall = time.perf_counter() - t
            t = time.perf_counter()
            if fmt == "merged":
                model = AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype)).eval()
            else:
                model = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(str(base_hf_dir), dtype=torch.float32), str(out)).eval()
            theirs = hf_logits(model, batch)
            results["runs"][f"{name} {fmt} {dtype}"] = {
                "export_s": round(wall, 2), "phases_s": {k: round(v, 2) for k, v in r.seconds.items()},
                "size_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 1e6, 1),
                "verify_in_command": r.checks["export_vs_ours"],
                "torch_vs_ours": verify.compare(ours, theirs, batch["segment_ids"]),
                "torch_load_and_forward_s": round(time.perf_counter() - t, 2)}
            print(f"{name} {fmt} {dtype}: {json.dumps(results['runs'][f'{name} {fmt} {dtype}'])}", file=sys.stderr,
                  flush=True)
            shutil.rmtree(out)
    print(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
