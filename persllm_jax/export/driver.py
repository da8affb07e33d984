"""Export a trained run to Hugging Face formats, verified numerically before anything appears at OUT.

A run is an SFT or DPO run directory (run.json + checkpoints/). A DPO run names its SFT parent in run.json
(`parent_run`, or `from` / `sft_run`; the parent's step in `parent_step` / `from_step` / `sft_step`, else its
latest), so a run resolves to a *chain*: base model, then one stage per run, each either a LoRA adapter
applied on the previous stage's merged weights, or full weights (full fine-tuning).

Formats:
  merged   every stage folded into the base; an HF directory (`model.safetensors`, or shards above
           `max_shard_size` plus `model.safetensors.index.json`), config.json (architecture kept, `dtype`
           recorded), tokenizer with chat template, generation_config.json, README.md model card.
  peft     see peft_export.py: one adapter on the original base (an SFT->DPO chain is stacked into rank r1+r2).

Every export is written into a temp directory next to OUT, reloaded with our own loader (no torch needed),
its logits compared with our model's on a few prompts, and only then renamed to OUT. A mismatch raises
`ExportError` and leaves OUT untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from persllm_jax.train import checkpoint
from persllm_jax.model import lora as lora_mod
from persllm_jax.model.decoder import forward
from persllm_jax.model.weights import (
    HF_LAYER_NAMES,
    LoadedModel,
    _layer_leaves,
    hf_layer_key,
    load_model,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_MAX_SHARD = "5GB"
PARENT_KEYS = ("parent_run", "from", "sft_run", "from_run")
PARENT_STEP_KEYS = ("parent_step", "from_step", "sft_step")
# Logit tolerances of the verification step, relative to max(1, max |logit|) of the reference.
WRITE_TOL = 1e-5  # exported weights reloaded vs the weights we meant to write (should be exact)
MODEL_TOL = {"float32": 1e-4, "bfloat16": None}  # merged/stacked vs our (unmerged) model; bf16 is judged by KL
# (SmolLM2-135M, 30 layers: merged vs unmerged differ by ~1.2e-5 relative in fp32, so 1e-4 leaves room for deeper
# models while a wrong merge is off by 1e-2 or more.)
BF16_MAX_KL = 0.05  # mean per-token KL(ours || export) allowed for a bfloat16 export


class ExportError(ValueError):
    pass


# --- the run chain -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    run_dir: Path
    info: dict  # run.json
    step: int
    kind: str  # "lora" or "params"
    weights: dict  # LoRA tree or full params
    scale: float | None  # alpha / r for LoRA

    @property
    def lora_info(self) -> dict:
        return self.info.get("lora") or {}


@dataclasses.dataclass
class Chain:
    base: LoadedModel
    base_spec: str  # how the base was named at training (HF dir, .gguf or `smollm2`)
    stages: list[Stage]  # root (SFT) first

    @property
    def last(self) -> Stage:
        return self.stages[-1]


def read_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    path = run_dir / "run.json"
    if not path.is_file():
        raise ExportError(f"{run_dir}: not a run directory (no run.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _steps(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(p.name) for p in ck.iterdir() if p.is_dir() and p.name.isdigit())


def _parent(info: dict, run_dir: Path) -> tuple[Path | None, int | None]:
    raw = next((info[k] for k in PARENT_KEYS if info.get(k)), None)
    step = next((info[k] for k in PARENT_STEP_KEYS if info.get(k) is not None), None)
    if raw is None:
        return None, None
    p = Path(raw)
    if not p.is_absolute() and not p.is_dir() and (run_dir / p).is_dir():
        p = run_dir / p
    return p, (int(step) if step is not None else None)


def _load_stage(run_dir: Path, info: dict, step: int | None) -> Stage:
    steps = _steps(run_dir)
    if not steps:
        raise ExportError(f"{run_dir}: no checkpoint (run it first, or check the path)")
    if step is not None and step not in steps:
        raise ExportError(f"{run_dir}: no checkpoint at step {step}; available: {', '.join(map(str, steps))}")
    step = steps[-1] if step is None else step
    try:
        weights, meta = checkpoint.load_trained(run_dir, step)
    except Exception as e:  # orbax raises a zoo of types for damaged checkpoints
        raise ExportError(f"{run_dir}: cannot read checkpoint {step}: {str(e).splitlines()[0]}") from None
    weights = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), weights)
    kind = meta.get("kind") or info.get("kind") or "lora"
    scale = None
    if kind == "lora":
        lo = info.get("lora") or {}
        if "rank" not in lo or "alpha" not in lo:
            raise ExportError(f"{run_dir}/run.json: LoRA run without lora.rank / lora.alpha")
        scale = float(lo.get("scale") or lora_mod.lora_scale(lo["rank"], lo["alpha"]))
    return Stage(run_dir, info, step, kind, weights, scale)


def base_spec_of(info: dict, run_dir: Path) -> str:
    """The base model as recorded: the resolved source if it still exists, else the spec given to train."""
    for key in ("model_source", "model"):
        spec = info.get(key)
        if not spec:
            continue
        if spec == "smollm2" or Path(spec).exists():
            return spec
        if (run_dir / spec).exists():
            return str(run_dir / spec)
    raise ExportError(f"{run_dir}/run.json: base model {info.get('model_source') or info.get('model')!r} not found")


def load_chain(run_dir: str | Path, step: int | None = None) -> Chain:
    """Base model and every stage from the root run to `run_dir` (weights on the host device, fp32 base)."""
    root_dir, root_info, stages = load_stages(run_dir, step)
    spec = base_spec_of(root_info, root_dir)
    try:
        base = load_model(spec)
    except Exception as e:
        raise ExportError(f"base model {spec}: {str(e).splitlines()[0]}") from None
    recorded = root_info.get("model_config")
    if recorded:
        for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            if k in recorded and recorded.get(k) != base.hf_config.get(k):
                raise ExportError(f"base model {spec}: {k} is {base.hf_config.get(k)!r} but the run was trained on "
                                  f"{recorded.get(k)!r}; the base changed since training")
    return Chain(base, spec, stages)


def load_stages(run_dir: str | Path, step: int | None = None) -> tuple[Path, dict, list[Stage]]:
    """(root run dir, its run.json, every stage from the root to `run_dir`), without the base weights."""
    run_dir = Path(run_dir)
    runs: list[tuple[Path, dict, int | None]] = []
    seen = set()
    cur, cur_step = run_dir, step
    while cur is not None:
        key = os.path.realpath(cur)
        if key in seen:
            raise ExportError(f"{run_dir}: run.json parents form a cycle at {cur}")
        seen.add(key)
        info = read_run(cur)
        runs.append((cur, info, cur_step))
        cur, cur_step = _parent(info, cur)
    runs.reverse()
    root_dir, root_info, _ = runs[0]
    return root_dir, root_info, [_load_stage(d, info, s) for d, info, s in runs]


def merged_params(chain: Chain, upto: int | None = None) -> dict:
    """fp32 params with stages [0, upto) applied (all of them by default)."""
    params = chain.base.params
    for st in chain.stages[:upto]:
        if st.kind == "lora":
            params = lora_mod.merge_lora(params, st.weights, st.scale)
        else:
            params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), st.weights)
    return params


# --- verification ------------------------------------------------------------------------------------


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


# --- HF state and safetensors ------------------------------------------------------------------------


def hf_state_from_params(cfg, params, dtype=np.float32) -> dict[str, np.ndarray]:
    """Inverse of `weights.params_from_hf_state`: our stacked [in, out] tree -> transformers names, [out, in]."""
    np_dtype = np.dtype(jnp.dtype(dtype))
    conv = lambda x: np.ascontiguousarray(np.asarray(jnp.asarray(x).astype(dtype))).astype(np_dtype, copy=False)
    state = {"model.embed_tokens.weight": conv(params["embed_tokens"])}
    layers = params["layers"]
    for i in range(cfg.num_layers):
        for name, leaf in _layer_leaves(cfg):
            if leaf is None:
                state[hf_layer_key(name, i)] = conv(layers[name][i])
            elif leaf == "kernel":
                state[hf_layer_key(name, i, "weight")] = conv(np.asarray(layers[name]["kernel"][i]).T)
            else:
                state[hf_layer_key(name, i, "bias")] = conv(layers[name]["bias"][i])
    state["model.norm.weight"] = conv(params["norm"])
    if "lm_head" in params:
        state["lm_head.weight"] = conv(np.asarray(params["lm_head"]["kernel"]).T)
    return state


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(s), re.IGNORECASE)
    if not m:
        raise ExportError(f"bad size {s!r}: use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def write_safetensors(state: dict[str, np.ndarray], out_dir: Path, max_shard_bytes: int,
                      prefix: str = "model") -> list[str]:
    """One file, or shards of at most `max_shard_bytes` (a bigger tensor gets its own) + an index."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in state.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / f"{prefix}.safetensors"), metadata={"format": "pt"})
        return [f"{prefix}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values())),
                          "total_parameters": int(sum(a.size for a in state.values()))},
             "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + [f"{prefix}.safetensors.index.json"]


def read_safetensors_dir(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="flax") as h:
            for k in h.keys():
                out[k] = np.asarray(h.get_tensor(k))
    return out


# --- HF directory pieces -----------------------------------------------------------------------------


def export_config(hf_config: dict, dtype: str) -> dict:
    cfg = {k: v for k, v in hf_config.items() if not k.startswith("_")}
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    import transformers

    cfg["transformers_version"] = transformers.__version__ if hasattr(transformers, "__version__") else cfg.get(
        "transformers_version")
    return dict(sorted(cfg.items()))


def generation_config(base: LoadedModel) -> dict:
    src = Path(base.source)
    if src.is_dir() and (src / "generation_config.json").is_file():
        return json.loads((src / "generation_config.json").read_text())
    c = base.cfg
    eos = list(c.eos_token_ids)
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
           "pad_token_id": c.pad_token_id}
    return {k: v for k, v in gen.items() if v is not None}


def save_tokenizer(spec: str, out_dir: Path):
    from persllm_jax.model.weights import load_tokenizer

    try:
        tok = load_tokenizer(spec)
    except Exception as e:
        raise ExportError(f"base model {spec}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
    tok.save_pretrained(str(out_dir))
    return tok


# --- the export driver -------------------------------------------------------------------------------


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
    return d if d in DTYPES else "float32"


def _tmp_dir(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir to OUT (an existing OUT is replaced only with `overwrite`)."""
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export(run_dir: str | Path, out: str | Path, fmt: str = "merged", dtype: str | None = None,
           step: int | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD, overwrite: bool = False,
           log=print, _tamper=None) -> ExportResult:
    """Export `run_dir` to `out` (see module doc). `_tamper(tmp_dir)` is a test hook run before verification."""
    out = Path(out)
    if fmt not in ("merged", "peft"):
        raise ExportError(f"unknown format {fmt!r}: use merged or peft")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: use float32 or bfloat16")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    max_bytes = parse_size(max_shard_size)
    times = {}
    t0 = time.perf_counter()
    chain = load_chain(run_dir, step)
    dtype = dtype or default_dtype(chain.base.hf_config)
    times["load"] = time.perf_counter() - t0
    log(f"run {run_dir}: {' -> '.join(f'{s.kind}@{s.step}' for s in chain.stages)} on {chain.base_spec}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(out)
    try:
        if fmt == "merged":
            files, checks = _export_merged(chain, tmp, dtype, max_bytes, times, _tamper, log)
        else:
            from persllm_jax.export.peft import export_peft

            files, checks = export_peft(chain, tmp, dtype, times, _tamper, log)
        from persllm_jax.export.model_card import write_model_card

        write_model_card(tmp, chain, fmt, dtype, checks)
        files = sorted(p.name for p in tmp.iterdir())
        _publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    times["total"] = time.perf_counter() - t0
    return ExportResult(out, fmt, dtype, files, checks, times)


def our_model_logits(chain: Chain, batch: dict) -> np.ndarray:
    """Logits of the trained model as training computes them: the last LoRA stage applied unmerged on top of
    the earlier stages merged (exactly the DPO policy), in fp32."""
    last = chain.last
    if last.kind == "lora":
        return logits_of(merged_params(chain, len(chain.stages) - 1), chain.base.cfg, batch, last.weights, last.scale)
    return logits_of(merged_params(chain), chain.base.cfg, batch)


def _export_merged(chain: Chain, tmp: Path, dtype: str, max_bytes: int, times: dict, tamper, log):
    cfg = chain.base.cfg
    t = time.perf_counter()
    params = merged_params(chain)
    state = hf_state_from_params(cfg, params, DTYPES[dtype])
    files = write_safetensors(state, tmp, max_bytes)
    (tmp / "config.json").write_text(json.dumps(export_config(chain.base.hf_config, dtype), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(generation_config(chain.base), indent=2) + "\n")
    tok = save_tokenizer(chain.base_spec, tmp)
    times["write"] = time.perf_counter() - t
    if tamper is not None:
        tamper(tmp)

    t = time.perf_counter()
    # Reference logits first, then drop the in-memory copies before the export is reloaded (peak memory:
    # base + merged + one HF state, never a fourth copy).
    batch = probe_batch(tok, cfg)
    ours = our_model_logits(chain, batch)
    intended = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(DTYPES[dtype]).astype(jnp.float32), params)
    want = logits_of(intended, cfg, batch)
    del intended, params
    back = read_safetensors_dir(tmp)
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
    got = logits_of(reloaded.params, reloaded.cfg, batch)
    del reloaded
    checks = {"reload_vs_written": compare(want, got, batch["segment_ids"]),
              "export_vs_ours": compare(ours, got, batch["segment_ids"])}
    check("reloaded export vs the weights written", checks["reload_vs_written"], WRITE_TOL, dtype)
    check("merged export vs our model", checks["export_vs_ours"], MODEL_TOL[dtype], dtype)
    times["verify"] = time.perf_counter() - t
    log(f"verified: max |logit diff| {checks['export_vs_ours']['max_abs_diff']:.3g} vs our model "
        f"(mean KL {checks['export_vs_ours']['mean_kl']:.3g}, top-1 agree {checks['export_vs_ours']['top1_agree']:.3f})")
    return files, checks


__all__ = [
    "HF_LAYER_NAMES",
    "ExportError",
    "ExportResult",
    "compare",
    "export",
    "hf_state_from_params",
    "load_chain",
    "logits_of",
    "merged_params",
    "our_model_logits",
    "probe_batch",
    "write_safetensors",
]
