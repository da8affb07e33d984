"""Export a trained run to Hugging Face formats, verified numerically before anything appears at OUT.

A run is an SFT or DPO run directory (run.json + checkpoints/). A DPO run names its SFT parent in run.json
(`parent_run`, or `from` / `sft_run`; the parent's step in `parent_step` / `from_step` / `sft_step`, else its
latest), so a run resolves to a *chain*: base model, then one stage per run, each either a LoRA adapter
applied on the previous stage's merged weights, or full weights (full fine-tuning).

Formats:
  merged   every stage folded into the base; an HF directory (`model.safetensors`, or shards above
           `max_shard_size` plus `model.safetensors.index.json`), config.json (architecture kept, `dtype`
           recorded), tokenizer with chat template, generation_config.json, README.md model card.
  peft     see peft.py: one adapter on the original base (an SFT->DPO chain is stacked into rank r1+r2).

Every export is written into a temp directory next to OUT, reloaded with our own loader (no torch needed),
its logits compared with our model's on a few prompts, and only then swapped in for OUT (persllm_jax/outputs.py:
OUT may not be the run, a parent run or the base model, and `--overwrite` replaces only an export we wrote).
A mismatch raises `ExportError` and leaves OUT untouched.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from persllm_jax.export import ExportError
from persllm_jax.export.hf_state import DEFAULT_MAX_SHARD, parse_size
from persllm_jax.export.merged import export_merged
from persllm_jax.export.model_card import write_model_card
from persllm_jax.export.peft import export_peft
from persllm_jax.io import DTYPE_NAMES
from persllm_jax.outputs import check_output, check_replaceable, replace_dir, temp_beside
from persllm_jax.runs import input_paths, load_chain


@dataclasses.dataclass
class ExportResult:
    out: Path
    format: str
    dtype: str
    files: list[str]
    checks: dict  # name -> compare() stats
    seconds: dict  # phase -> seconds


def default_dtype(hf_config: dict) -> str:
    d = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    return d if d in DTYPE_NAMES else "float32"


def export(run_dir: str | Path, out: str | Path, fmt: str = "merged", dtype: str | None = None,
           step: int | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD, overwrite: bool = False,
           log=print) -> ExportResult:
    """Export `run_dir` to `out` (see module doc)."""
    out = Path(out)
    if fmt not in ("merged", "peft"):
        raise ExportError(f"unknown format {fmt!r}: use merged or peft")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ExportError(f"unknown dtype {dtype!r}: use float32 or bfloat16")
    check_output(out, input_paths(run_dir))  # never the run, its parents or the base model
    check_replaceable(out, overwrite)  # and only a folder we wrote: checked before minutes of work
    max_bytes = parse_size(max_shard_size)
    times = {}
    t0 = time.perf_counter()
    chain = load_chain(run_dir, step)
    dtype = dtype or default_dtype(chain.base.hf_config)
    times["load"] = time.perf_counter() - t0
    log(f"run {run_dir}: {' -> '.join(f'{s.kind}@{s.step}' for s in chain.stages)} on {chain.base_spec}")
    tmp = temp_beside(out)
    try:
        if fmt == "merged":
            files, checks = export_merged(chain, tmp, dtype, max_bytes, times, log)
        else:
            files, checks = export_peft(chain, tmp, dtype, times, log)

        write_model_card(tmp, chain, fmt, dtype, checks)
        files = sorted(p.name for p in tmp.iterdir())
        replace_dir(tmp, out, overwrite, "export")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    times["total"] = time.perf_counter() - t0
    return ExportResult(out, fmt, dtype, files, checks, times)


__all__ = ["ExportError", "ExportResult", "export", "default_dtype"]
