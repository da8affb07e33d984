"""Typed training configs: dataclasses loaded from YAML, every field overridable with `--set key=value`.

Nested sections are dataclasses too (`lora.rank`, `mesh.fsdp`). Where TRL (SFTConfig/DPOConfig 1.16, its
ModelConfig's `lora_*`) or PEFT (LoraConfig) call the same thing by another name, that name is an alias
(`_f(default, "alias", ...)`): a TRL user's config keys work as they are. Loading (unknown keys, coercion, `--set`) is
`persllm_jax.settings`; this module holds the schemas and their value checks. DPO extends `TrainConfig` by
subclassing the dataclass (adding `beta`, `loss_type`, ...); `load_config(cls, ...)` works for any such class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from persllm_jax import settings
from persllm_jax.io import atomic_write_text
from persllm_jax.settings import ConfigError


REPORT_TO = ("jsonl", "tensorboard", "wandb", "none")  # train/report_to.py; metrics.jsonl is always written


def _f(default, *aliases, factory=None):
    """A field with a default (or default factory) and the other names it is accepted under (settings.py)."""
    meta = {"aliases": aliases[0] if aliases and isinstance(aliases[0], dict) else tuple(aliases)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = _f(16, "r")  # PEFT LoraConfig names
    alpha: float = _f(32.0, "lora_alpha")
    dropout: float = _f(0.0, "lora_dropout")
    targets: list[str] = _f(None, "target_modules", factory=lambda: ["all-linear"])  # regexes over q_proj ... down_proj


@dataclass
class MeshConfig:
    data: int = -1  # -1 fills with the devices left over
    fsdp: int = 1
    tensor: int = 1


@dataclass
class TrainConfig:
    # names TRL users bring that mean something else here: the unknown-key error says what to set instead
    KEY_HINTS: ClassVar[dict] = {"per_device_train_batch_size": "our batch_size is the global batch (rows per step "
                                 "over all devices): set batch_size = per-device rows x mesh.data x mesh.fsdp"}
    model: str = _f("smollm2", "model_name_or_path")  # HF dir, .gguf file, or `smollm2`
    data: str = ""  # corpus dir (reads sft/train.jsonl) or a .jsonl file
    steps: int = _f(0, "max_steps")  # optimizer steps; 0 = derived from epochs
    epochs: float = _f(1.0, "num_train_epochs")
    # packed rows of max_length tokens per micro-step, global (all devices), unlike TRL's per-device count
    batch_size: int = 8
    grad_accum: int = _f(1, "gradient_accumulation_steps")
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio (paper: 0.1)
    weight_decay: float = 0.0
    adam_b1: float = _f(0.9, "adam_beta1")
    adam_b2: float = _f(0.95, "adam_beta2")
    adam_eps: float = _f(1e-8, "adam_epsilon")
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int = 1024  # tokens per packed row; longer conversations are truncated (counted)
    packing: bool = True  # False: one conversation per row
    shuffle: bool = _f(True, "shuffle_dataset")
    seed: int = 0
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (master weights and loss stay fp32)
    remat: bool = _f(False, "gradient_checkpointing", "activation_checkpointing")  # transformers 5 renames it
    attention: str = "auto"  # auto | flash | splash | cudnn | reference (persllm_jax/model/attention.py)
    save_every: int = _f(0, "save_steps")  # 0 = only at the end
    keep_checkpoints: int = _f(3, "save_total_limit")
    log_every: int = _f(10, "logging_steps")
    report_to: list[str] = _f(None, factory=lambda: ["jsonl"])  # + tensorboard, wandb (optional extras)
    eval_every: int = _f(0, "eval_steps")  # held-out eval_loss every N steps and at the end; 0 = off
    eval_data: str = ""  # held-out file; "" = the corpus' sft/test.jsonl (DPO: dpo/test.jsonl or eval_fraction)
    peak_tflops: float = 0.0  # per device, for MFU; 0 = measure a matmul at start
    distributed: bool = False  # call jax.distributed.initialize() (multi-host); see docs/scale.md
    coordinator_address: str = ""  # host:port of process 0; "" = JAX_COORDINATOR_ADDRESS or autodetect (TPU, SLURM)
    num_processes: int = 0  # 0 = JAX_NUM_PROCESSES or autodetect
    process_id: int = -1  # -1 = JAX_PROCESS_ID or autodetect
    lora: LoraConfig = _f(None, {"use_peft": "enabled", "lora_r": "rank", "lora_alpha": "alpha",
                                 "lora_dropout": "dropout", "lora_target_modules": "targets"}, factory=LoraConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


LOSS_TYPES = ("sigmoid", "ipo", "hinge")
ATTENTION_IMPLS = ("auto", "flash", "splash", "cudnn", "reference")  # as model/attention.IMPLS (no JAX import here)


@dataclass
class DPOConfig(TrainConfig):
    """SFT keys plus the DPO ones. `from_run` is the SFT run whose merged weights are the base and the
    reference (empty: DPO on the base model); `data` is a corpus dir (reads dpo/train.jsonl) or a .jsonl file."""

    from_run: str = ""
    from_step: int = -1  # -1 = the SFT run's latest checkpoint
    learning_rate: float = 5e-5
    batch_size: int = 4  # packed rows (whole prompt+chosen+rejected pairs) per micro-step
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (cDPO with label_smoothing) | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid only: assumed fraction of flipped labels (cDPO)
    nll_weight: float = _f(0.0, "rpo_alpha")  # weight of the NLL on chosen tokens (RPO; TRL 0.x's rpo_alpha); 0 = off
    precompute_ref: bool = _f(False, "precompute_ref_log_probs")  # reference log-probs computed once, cached in the run dir
    eval_fraction: float = 0.1  # eval_every without dpo/test.jsonl or eval_data: this share of the pairs held out


def load_config(cls=TrainConfig, path: str | Path | None = None, overrides=(), base: dict | None = None):
    """`cls()` updated by `base` (a dict), then the YAML file at `path`, then `--set` overrides, then validated."""
    cfg = settings.load(cls, path, overrides, base=base)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    checks = [
        ("batch_size", cfg.batch_size >= 1), ("grad_accum", cfg.grad_accum >= 1), ("steps", cfg.steps >= 0),
        ("epochs", cfg.epochs > 0), ("max_length", cfg.max_length >= 8), ("learning_rate", cfg.learning_rate >= 0),
        ("warmup_steps", cfg.warmup_steps >= 0), ("save_every", cfg.save_every >= 0), ("log_every", cfg.log_every >= 1),
        ("keep_checkpoints", cfg.keep_checkpoints >= 1), ("dtype", cfg.dtype in ("float32", "bfloat16")),
        ("lora.rank", cfg.lora.rank >= 1), ("lora.dropout", 0.0 <= cfg.lora.dropout < 1.0),
        ("min_lr_ratio", 0.0 <= cfg.min_lr_ratio <= 1.0), ("attention", cfg.attention in ATTENTION_IMPLS),
        ("eval_every", cfg.eval_every >= 0), ("report_to", all(r in REPORT_TO for r in cfg.report_to)),
    ]
    for key, ok in checks:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            extra = {"attention": f" (one of {', '.join(ATTENTION_IMPLS)})",
                     "report_to": f" (each one of {', '.join(REPORT_TO)})"}.get(key, "")
            raise ConfigError(f"config: invalid value for {key}: {value!r}{extra}")
    if isinstance(cfg, DPOConfig):
        for key, ok in [("beta", cfg.beta > 0), ("loss_type", cfg.loss_type in LOSS_TYPES),
                        ("label_smoothing", 0.0 <= cfg.label_smoothing < 0.5), ("nll_weight", cfg.nll_weight >= 0),
                        ("eval_fraction", 0.0 < cfg.eval_fraction < 1.0)]:
            if not ok:
                extra = f" (one of {', '.join(LOSS_TYPES)})" if key == "loss_type" else ""
                raise ConfigError(f"config: invalid value for {key}: {getattr(cfg, key)!r}{extra}")
    for axis in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, axis)
        if v == 0 or v < -1:
            raise ConfigError(f"config: mesh.{axis} must be a positive size or -1, got {v}")


def save_config(cfg, path: str | Path) -> None:
    atomic_write_text(path, settings.dump(cfg))


__all__ = ["REPORT_TO", "TrainConfig", "DPOConfig", "LoraConfig", "MeshConfig", "ConfigError", "load_config", "save_config"]
