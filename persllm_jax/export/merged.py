"""The merged export: every stage folded into the base, written as an HF directory (safetensors, config.json,
generation_config.json, tokenizer), then reloaded and checked against the weights written and our model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.export import ExportError, hf_state
from persllm_jax.export import verify
from persllm_jax.io import jnp_dtype
from persllm_jax.model.weights import load_model
from persllm_jax.runs import Chain, merged_params


def export_merged(chain: Chain, tmp: Path, dtype: str, max_bytes: int, times: dict, log,
                  phase=lambda name: None):
    cfg = chain.base.cfg
    phase("write")
    t = time.perf_counter()
    params = merged_params(chain)
    state = hf_state.hf_state_from_params(cfg, params, jnp_dtype(dtype))
    files = hf_state.write_safetensors(state, tmp, max_bytes)
    (tmp / "config.json").write_text(json.dumps(hf_state.export_config(chain.base.hf_config, dtype), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(hf_state.generation_config(chain.base), indent=2) + "\n")
    tok = hf_state.save_tokenizer(chain.base_spec, tmp)
    times["write"] = time.perf_counter() - t

    phase("verify")
    t = time.perf_counter()
    # Reference logits first, then drop the in-memory copies before the export is reloaded (peak memory:
    # base + merged + one HF state, never a fourth copy).
    batch = verify.probe_batch(tok, cfg)
    ours = verify.our_model_logits(chain, batch)
    intended = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp_dtype(dtype)).astype(jnp.float32), params)
    want = verify.logits_of(intended, cfg, batch)
    del intended, params
    back = hf_state.read_safetensors_dir(tmp)
    bad = [k for k in state if k not in back or back[k].dtype != state[k].dtype or not np.array_equal(back[k], state[k])]
    extra = sorted(set(back) - set(state))
    del back, state
    if bad or extra:
        raise ExportError(f"verification failed: tensors read back differ from those written ({(bad + extra)[:3]}); "
                          "nothing was written")
    try:
        reloaded = load_model(str(tmp))
    except Exception as e:
        raise ExportError(f"verification failed: the export does not load: {str(e).splitlines()[0]}") from None
    got = verify.logits_of(reloaded.params, reloaded.cfg, batch)
    del reloaded
    checks = {"reload_vs_written": verify.compare(want, got, batch["segment_ids"]),
              "export_vs_ours": verify.compare(ours, got, batch["segment_ids"])}
    verify.check("reloaded export vs the weights written", checks["reload_vs_written"], verify.WRITE_TOL, dtype)
    verify.check("merged export vs our model", checks["export_vs_ours"], verify.MODEL_TOL[dtype], dtype)
    times["verify"] = time.perf_counter() - t
    log(f"verified: max |logit diff| {checks['export_vs_ours']['max_abs_diff']:.3g} vs our model "
        f"(mean KL {checks['export_vs_ours']['mean_kl']:.3g}, top-1 agree {checks['export_vs_ours']['top1_agree']:.3f})")
    return files, checks
