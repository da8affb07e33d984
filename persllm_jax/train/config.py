"""Typed training configs: dataclasses loaded from YAML, every field overridable with `--set key=value`.

Nested sections are dataclasses too (`lora.rank`, `mesh.fsdp`). Unknown keys are rejected with the list of
valid ones; values are checked against the field types. DPO extends `TrainConfig` by subclassing the
dataclass (adding `beta`, `loss_type`, ...); `load_config(cls, ...)` works for any such class.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class LoraConfig:
    enabled: bool = True
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # regexes over q_proj ... down_proj


@dataclass
class MeshConfig:
    data: int = -1  # -1 fills with the devices left over
    fsdp: int = 1
    tensor: int = 1


@dataclass
class TrainConfig:
    model: str = "smollm2"  # HF dir, .gguf file, or `smollm2`
    data: str = ""  # corpus dir (reads sft/train.jsonl) or a .jsonl file
    steps: int = 0  # optimizer steps; 0 = derived from epochs
    epochs: float = 1.0
    batch_size: int = 8  # packed rows of max_length tokens per micro-step (global, all devices)
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio (paper: 0.1)
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int = 1024  # tokens per packed row; longer conversations are truncated (counted)
    packing: bool = True  # False: one conversation per row
    shuffle: bool = True
    seed: int = 0
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (master weights and loss stay fp32)
    remat: bool = False
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    peak_tflops: float = 0.0  # per device, for MFU; 0 = measure a matmul at start
    distributed: bool = False  # call jax.distributed.initialize() (multi-host); see docs/scale.md
    coordinator_address: str = ""  # host:port of process 0; "" = JAX_COORDINATOR_ADDRESS or autodetect (TPU, SLURM)
    num_processes: int = 0  # 0 = JAX_NUM_PROCESSES or autodetect
    process_id: int = -1  # -1 = JAX_PROCESS_ID or autodetect
    lora: LoraConfig = field(default_factory=LoraConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)


LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig(TrainConfig):
    """SFT keys plus the DPO ones. `from_run` is the SFT run whose merged weights are the base and the
    reference (empty: DPO on the base model); `data` is a corpus dir (reads dpo/train.jsonl) or a .jsonl file."""

    from_run: str = ""
    from_step: int = -1  # -1 = the SFT run's latest checkpoint
    learning_rate: float = 5e-5
    batch_size: int = 4  # packed rows (each holds whole prompt+chosen+rejected pairs) per micro-step
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid (cDPO with label_smoothing) | ipo | hinge
    label_smoothing: float = 0.0  # sigmoid only: assumed fraction of flipped labels (cDPO)
    nll_weight: float = 0.0  # weight of the NLL on chosen tokens (RPO); 0 = off
    precompute_ref: bool = False  # reference log-probs computed once before training, cached under the run dir


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def valid_keys(cls, prefix: str = "") -> list[str]:
    out = []
    for name, (_, tp) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out += valid_keys(tp, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _coerce(value, tp, key: str, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [_coerce(v, item, key, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-5` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def _apply(obj, mapping: dict, where: str, prefix: str = ""):
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: section {prefix.rstrip('.') or '<top>'} must be a mapping")
    fields = _fields(type(obj))
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown config key {full!r}; valid keys: {', '.join(valid_keys(type(obj), prefix))}")
        _, tp = fields[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value, where, full + ".")
        else:
            setattr(obj, key, _coerce(value, tp, full, where))


def parse_set(items) -> list[tuple[str, object]]:
    out = []
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def _nest(key: str, value) -> dict:
    d = value
    for part in reversed(key.split(".")):
        d = {part: d}
    return d


def load_config(cls=TrainConfig, path: str | Path | None = None, overrides=(), base: dict | None = None):
    """`cls()` updated by `base` (a dict), then the YAML file at `path`, then `--set` overrides, in order."""
    cfg = cls()
    if base:
        _apply(cfg, base, "defaults")
    if path:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
        _apply(cfg, data, str(p))
    for key, value in parse_set(overrides):
        _apply(cfg, _nest(key, value), f"--set {key}")
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    checks = [
        ("batch_size", cfg.batch_size >= 1), ("grad_accum", cfg.grad_accum >= 1), ("steps", cfg.steps >= 0),
        ("epochs", cfg.epochs > 0), ("max_length", cfg.max_length >= 8), ("learning_rate", cfg.learning_rate >= 0),
        ("warmup_steps", cfg.warmup_steps >= 0), ("save_every", cfg.save_every >= 0), ("log_every", cfg.log_every >= 1),
        ("keep_checkpoints", cfg.keep_checkpoints >= 1), ("dtype", cfg.dtype in ("float32", "bfloat16")),
        ("lora.rank", cfg.lora.rank >= 1), ("lora.dropout", 0.0 <= cfg.lora.dropout < 1.0),
        ("min_lr_ratio", 0.0 <= cfg.min_lr_ratio <= 1.0),
    ]
    for key, ok in checks:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"config: invalid value for {key}: {value!r}")
    if isinstance(cfg, DPOConfig):
        for key, ok in [("beta", cfg.beta > 0), ("loss_type", cfg.loss_type in LOSS_TYPES),
                        ("label_smoothing", 0.0 <= cfg.label_smoothing < 0.5), ("nll_weight", cfg.nll_weight >= 0)]:
            if not ok:
                extra = f" (one of {', '.join(LOSS_TYPES)})" if key == "loss_type" else ""
                raise ConfigError(f"config: invalid value for {key}: {getattr(cfg, key)!r}{extra}")
    for axis in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, axis)
        if v == 0 or v < -1:
            raise ConfigError(f"config: mesh.{axis} must be a positive size or -1, got {v}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["TrainConfig", "DPOConfig", "LoraConfig", "MeshConfig", "ConfigError", "load_config", "save_config", "to_dict",
           "valid_keys", "parse_set"]
