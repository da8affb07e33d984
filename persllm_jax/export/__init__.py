"""Export a trained run to Hugging Face formats, verified numerically before anything appears at OUT.

    driver.py      `export()`: resolve the run chain (runs.py), write into a temp dir beside OUT, verify, rename
    merged.py      every stage folded into the base: an HF model directory
    peft.py        one PEFT adapter on the original base (an SFT -> DPO chain stacked into one)
    hf_state.py    our params -> transformers names and layout, safetensors shards, config / tokenizer files
    verify.py      probe prompts and the logit comparisons that gate every export
    model_card.py  README.md of an export;  hub.py: the upload

May import: errors, io, runs, model/. Never train/ (beyond what runs reads), serve/, eval/, pipeline/, cli/.
"""

from persllm_jax.errors import PersllmError


class ExportError(PersllmError, ValueError):
    """An export that cannot be made or fails its verification (nothing is written at OUT then)."""
