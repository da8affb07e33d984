"""Export a trained run to Hugging Face formats, verified numerically before anything appears at OUT.

A run is an SFT or DPO run directory (run.json + checkpoints/). A DPO run names its SFT parent in run.json
(`parent_run`, or `from` / `sft_run`; the parent's step in `parent_step` / `from_step` / `sft_step`, else its
latest), so a run resolves to a *chain*: base model, then one stage per run, each either a LoRA adapter
applied on the previous stage's merged weights, or full weights (full fine-tuning).

Formats:
  merged   every stage folded into the base; an HF directory (`model.safetensors`, or shards above
           `max_shard_size` plus `model.safetensors.index.json`), config.json (architecture kept, the dtype
           recorded as `dtype` and `torch_dtype`), tokenizer with chat template (saved as
           `PreTrainedTokenizerFast`), generation_config.json, README.md model card (model_card.py).
  peft     see peft.py: one adapter on the original base (an SFT->DPO chain is stacked into rank r1+r2);
           adapter_config.json's `r` is the `--max-lora-rank` a LoRA server (vLLM) needs.

Compatibility: a merged export loads with transformers 5.x (the project's) and 4.57 (checked: 4.57.6 with
huggingface_hub 0.36 and tokenizers 0.22 loads the model and tokenizer, chat template included, and gives our
logits: max |diff| 1.2e-4 at logit scale 38 for SmolLM2-135M); 4.57 is the oldest checked. Older versions read `torch_dtype` and the fast tokenizer the same way.

Every export is written into a temp directory next to OUT, reloaded with our own loader (no torch needed),
its logits compared with our model's on a few prompts, and only then swapped in for OUT (persllm_jax/outputs.py:
OUT may not be the run, a parent run or the base model, and `--overwrite` replaces only an export we wrote).
A mismatch raises `ExportError` and leaves OUT untouched.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
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
           log=print, repo_id: str | None = None, eval_dir: str | Path | None = None,
           progress: bool = False) -> ExportResult:
    """Export `run_dir` to `out` (see module doc). `repo_id`: the Hub repo the export is for (the card's usage
    snippet loads it); `eval_dir`: a `persllm eval` output whose results go into the card; `progress`: a tqdm
    bar of the phases (load, write, verify, card) on stderr when it is a terminal."""
    out = Path(out)
    if fmt not in ("merged", "peft"):
        raise ExportError(f"unknown format {fmt!r}: use merged or peft")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ExportError(f"unknown dtype {dtype!r}: use float32 or bfloat16")
    check_output(out, input_paths(run_dir))  # never the run, its parents or the base model
    check_replaceable(out, overwrite)  # and only a folder we wrote: checked before minutes of work
    max_bytes = parse_size(max_shard_size)
    if eval_dir is not None and not Path(eval_dir).is_dir():
        raise ExportError(f"--eval {eval_dir}: no such folder (give a `persllm eval --out` folder)")
    bar = _phase_bar(progress)
    times = {}
    t0 = time.perf_counter()
    bar("load")
    chain = load_chain(run_dir, step)
    dtype = dtype or default_dtype(chain.base.hf_config)
    times["load"] = time.perf_counter() - t0
    log(f"run {run_dir}: {' -> '.join(f'{s.kind}@{s.step}' for s in chain.stages)} on {chain.base_spec}")
    tmp = temp_beside(out)
    try:
        if fmt == "merged":
            files, checks = export_merged(chain, tmp, dtype, max_bytes, times, log, bar)
        else:
            files, checks = export_peft(chain, tmp, dtype, times, log, bar)
        bar("card")
        write_model_card(tmp, chain, fmt, dtype, checks, repo_id=repo_id, local=str(out),
                         eval_dir=Path(eval_dir) if eval_dir is not None else None)
        files = sorted(p.name for p in tmp.iterdir())
        replace_dir(tmp, out, overwrite, "export")
        bar(None)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    times["total"] = time.perf_counter() - t0
    return ExportResult(out, fmt, dtype, files, checks, times)


PHASES = ("load", "write", "verify", "card")


class _phase_bar:
    """Called with each phase's name as it starts (None: done); a tqdm bar on stderr when enabled."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            # disable=None: only on a terminal, so a log file or a captured stderr keeps its one-line errors
            self.bar = tqdm(total=len(PHASES), desc="export", unit="phase", file=sys.stderr, dynamic_ncols=True,
                            disable=None)
        self.done = 0

    def __call__(self, name: str | None) -> None:
        if self.bar is None:
            return
        target = PHASES.index(name) if name in PHASES else len(PHASES)  # phases before this one are done
        if target > self.done:
            self.bar.update(target - self.done)
            self.done = target
        if name:
            self.bar.set_description(f"export: {name}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["ExportError", "ExportResult", "export", "default_dtype"]
