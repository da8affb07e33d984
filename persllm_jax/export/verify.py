"""The numerical gate of every export: a few probe prompts, our model's logits, the export's logits reloaded
with our own loader, and tolerances they must meet (relative to max(1, max |logit|), or KL for bf16)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.export import ExportError
from persllm_jax.model.decoder import forward
from persllm_jax.runs import Chain, merged_params

# Logit tolerances of the verification step, relative to max(1, max |logit|) of the reference.
WRITE_TOL = 1e-5  # exported weights reloaded vs the weights we meant to write (should be exact)
MODEL_TOL = {"float32": 1e-4, "bfloat16": None}  # merged/stacked vs our (unmerged) model; bf16 is judged by KL
# (SmolLM2-135M, 30 layers: merged vs unmerged differ by ~1.2e-5 relative in fp32, so 1e-4 leaves room for deeper
# models while a wrong merge is off by 1e-2 or more.)
BF16_MAX_KL = 0.05  # mean per-token KL(ours || export) allowed for a bfloat16 export



def probe_batch(tokenizer, cfg, n_random: int = 1, length: int = 24, seed: int = 0) -> dict:
    """A few prompts as one right-padded batch: chat-formatted texts (when a tokenizer is given) + random ids."""
    rows: list[list[int]] = []
    if tokenizer is not None:
        convs = [[{"role": "user", "content": "Who are you, and what do you care about most?"}],
                 [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Tell me about your early years."},
                  {"role": "assistant", "content": "I was born long ago."},
                  {"role": "user", "content": "And then?"}]]
        for c in convs:
            try:
                ids = tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                ids = [int(i) for i in ids][:64]
            except Exception:
                ids = [int(i) for i in tokenizer(c[-1]["content"])["input_ids"]][:64]
            if ids:
                rows.append(ids)
    rng = np.random.default_rng(seed)
    for _ in range(n_random):
        rows.append(rng.integers(0, cfg.vocab_size, size=length).tolist())
    T = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), T), np.int32)
    seg = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], seg[i, :len(r)] = r, 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "positions": pos, "segment_ids": seg}


@functools.partial(jax.jit, static_argnums=(1,))
def _forward(params, cfg, tokens, positions, segment_ids, lora, scale):
    return forward(params, cfg, tokens, positions, segment_ids, lora=lora, lora_scale=scale)


def logits_of(params, cfg, batch, lora=None, scale=1.0) -> np.ndarray:
    """fp32 logits at full matmul precision (accelerators default to bf16 passes for fp32 matmuls)."""
    with jax.default_matmul_precision("highest"):
        out = _forward(params, cfg, jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                       jnp.asarray(batch["segment_ids"]), lora, jnp.float32(scale))
    return np.asarray(out, np.float32)


def compare(ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> dict:
    """max |diff|, scale (max |ref|), mean per-token KL(ref || got) and top-1 agreement on valid positions."""
    r, g = ref[mask.astype(bool)], got[mask.astype(bool)]
    lr = r - np.logaddexp.reduce(r, axis=-1, keepdims=True)
    lg = g - np.logaddexp.reduce(g, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(lr) * (lr - lg), axis=-1)))
    return {"max_abs_diff": float(np.max(np.abs(r - g))), "logit_scale": float(np.max(np.abs(r))),
            "mean_kl": max(kl, 0.0), "top1_agree": float(np.mean(r.argmax(-1) == g.argmax(-1)))}


def check(name: str, stats: dict, tol: float | None, dtype: str) -> None:
    """Raise ExportError unless `stats` is within `tol` (relative to max(1, |logits|)) or, for bf16, KL."""
    if tol is not None:
        limit = tol * max(1.0, stats["logit_scale"])
        if not stats["max_abs_diff"] <= limit:
            raise ExportError(f"verification failed ({name}): exported logits differ from ours by "
                              f"{stats['max_abs_diff']:.3g} (allowed {limit:.3g}); nothing was written")
    elif not stats["mean_kl"] <= BF16_MAX_KL:
        raise ExportError(f"verification failed ({name}): {dtype} export has mean KL {stats['mean_kl']:.3g} from "
                          f"our model (allowed {BF16_MAX_KL}); nothing was written")


def our_model_logits(chain: Chain, batch: dict) -> np.ndarray:
    """Logits of the trained model as training computes them: the last LoRA stage applied unmerged on top of
    the earlier stages merged (exactly the DPO policy), in fp32."""
    last = chain.last
    if last.kind == "lora":
        return logits_of(merged_params(chain, len(chain.stages) - 1), chain.base.cfg, batch, last.weights, last.scale)
    return logits_of(merged_params(chain), chain.base.cfg, batch)
