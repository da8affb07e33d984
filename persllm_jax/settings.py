"""THE config loader: defaults < a YAML file < `--set a.b=value` overrides, for every command that takes a config.

A schema is either a dataclass (training: `TrainConfig`, `DPOConfig`, nested dataclasses for sections) or a
mapping of defaults (data build, eval, reproduce), where each default's type is the key's type and a `None`
default takes any value. The rules are the same for both:

- unknown keys are errors that list the valid ones (a typo must not fall back to a default silently);
- values are coerced to the key's type (`"5e-5"` to a float, `"a,b"` to a list, `yes` to a bool) or refused
  with the key's name;
- `--set key=VALUE` parses VALUE as YAML; `--set key=` (nothing after `=`) gives the key's empty value: `""`
  for a string, `[]` for a list, `{}` for a mapping, `None` where `None` is allowed, an error otherwise;
- `whole` keys of a mapping schema are replaced as a whole by a file or `--set` rather than merged key by key;
- a dataclass field may accept other names (TRL's, PEFT's): `field(metadata={"aliases": ("max_steps",)})`, or
  on a section field a mapping `{"lora_r": "rank"}` from top-level names to keys inside it. An alias is stored
  under our name (so `--print-config` and errors show ours); giving both names at once is an error.

Imports only the standard library, yaml and the error base, so data_gen uses it too.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from persllm_jax.errors import PersllmError
from persllm_jax.io import read_yaml


class ConfigError(PersllmError, ValueError):
    """A config file or `--set` override that does not fit the schema; the message names the key."""


class _Empty:
    def __repr__(self):
        return "<empty>"


EMPTY = _Empty()  # the value of `--set key=`


# --- --set ------------------------------------------------------------------------------------------


def parse_set(items) -> list[tuple[str, object]]:
    """[(dotted key, value)] of `--set key=value` items; values parsed as YAML, `key=` gives EMPTY."""
    out = []
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else EMPTY
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def nest(key: str, value) -> dict:
    """`nest("a.b", 1) == {"a": {"b": 1}}`."""
    d = value
    for part in reversed(key.split(".")):
        d = {part: d}
    return d


# --- coercion ---------------------------------------------------------------------------------------


def _optional(tp) -> tuple[bool, object]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return len(args) < len(typing.get_args(tp)), (args[0] if args else typing.Any)
    return False, tp


def coerce(value, tp, key: str, where: str):
    """`value` as type `tp` (a type hint; `typing.Any` takes anything), or a ConfigError naming `key`."""
    optional, tp = _optional(tp)
    origin = typing.get_origin(tp) or tp
    if value is EMPTY:
        if origin is str:
            return ""
        if origin is list:
            return []
        if origin is dict:
            return {}
        if optional or tp is typing.Any:
            return None
        raise ConfigError(f"{where}: {key} needs a value (an empty one is allowed only for strings, lists, "
                          f"mappings and keys that may be null)")
    if value is None and (optional or tp is typing.Any):
        return None
    if tp is typing.Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return [coerce(v, item, key, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
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


def _type_of_default(default):
    if default is None:
        return typing.Any
    if isinstance(default, bool):
        return bool
    if isinstance(default, float):
        return float  # an int given for a float key is fine
    if isinstance(default, int):
        return int
    if isinstance(default, (list, tuple)):
        return list
    if isinstance(default, dict):
        return dict
    return type(default)


def _fields(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# --- aliases (other tools' names for our keys) ------------------------------------------------------


def _alias_map(cls) -> dict[str, str]:
    """{alias: our key relative to `cls`} from the fields' `aliases` metadata (see the module docstring)."""
    out = {}
    for f in dataclasses.fields(cls):
        names = f.metadata.get("aliases", ())
        if isinstance(names, dict):  # a section field: top-level names for keys inside the section
            out.update({alias: f"{f.name}.{inner}" for alias, inner in names.items()})
        else:
            out.update({alias: f.name for alias in names})
    return out


def aliases(schema, prefix: str = "") -> dict[str, str]:
    """Every {dotted alias: our dotted key} of a dataclass schema (for `--help` and `canonical_key`)."""
    cls = schema if isinstance(schema, type) else type(schema)
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {prefix + a: prefix + k for a, k in _alias_map(cls).items()}
    for name, tp in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(aliases(tp, f"{prefix}{name}."))
    return out


def canonical_key(schema, key: str) -> str:
    """Our name for the dotted `key` (itself when it is not an alias)."""
    return aliases(schema).get(key, key)


def alias_help(schema) -> str:
    """One line for `--help`: the other names accepted, as `alias -> ours`."""
    table = aliases(schema)
    return ", ".join(f"{a} -> {k}" for a, k in table.items())


def _canonical(over: dict, cls, where: str, prefix: str) -> dict:
    """`over` with the aliases of `cls`'s fields renamed to ours; an alias given with its key is an error."""
    amap = _alias_map(cls)
    if not any(name in amap for name in over):
        return over
    out = {k: v for k, v in over.items() if k not in amap}
    for name, value in over.items():
        if name not in amap:
            continue
        target = amap[name]
        head, _, leaf = target.partition(".")
        dst, key = out, target
        if leaf:
            section = out.get(head, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{where}: section {prefix}{head} must be a mapping, got {section!r}")
            dst, key = dict(section), leaf
            out[head] = dst
        if key in dst:
            raise ConfigError(f"{where}: {prefix}{name} is another name for {prefix}{target}; give only one of them")
        dst[key] = value
    return out


# --- applying a mapping onto a config ---------------------------------------------------------------


def valid_keys(schema, prefix: str = "", whole=()) -> list[str]:
    """Every dotted key of a dataclass class/instance or a defaults mapping."""
    out = []
    if dataclasses.is_dataclass(schema):
        for name, tp in _fields(schema if isinstance(schema, type) else type(schema)).items():
            out += valid_keys(tp, f"{prefix}{name}.", whole) if dataclasses.is_dataclass(tp) else [prefix + name]
        return out
    for name, default in schema.items():
        key = prefix + name
        if isinstance(default, dict) and default and key not in whole:
            out += valid_keys(default, key + ".", whole)
        else:
            out.append(key)
    return out


def _unknown(key: str, where: str, schema, prefix: str, whole) -> ConfigError:
    hint = getattr(schema, "KEY_HINTS", {}).get(key)  # a schema's word on a name that means something else there
    if hint:
        return ConfigError(f"{where}: unknown config key {key!r}: {hint}")
    return ConfigError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(valid_keys(schema, prefix, whole))}")


def apply(cfg, over, where: str, prefix: str = "", whole=(), open_sections=()):
    """Apply the mapping `over` onto `cfg` (a dataclass instance, changed in place, or a dict, changed in place).
    `open_sections`: mapping keys whose contents are checked elsewhere (merged as given, or a file name)."""
    if over is None:
        return cfg
    if not isinstance(over, dict):
        raise ConfigError(f"{where}: section {prefix.rstrip('.') or '<top>'} must be a mapping, got {over!r}")
    if dataclasses.is_dataclass(cfg):
        fields = _fields(type(cfg))
        over = _canonical(over, type(cfg), where, prefix)
        for name, value in over.items():
            key = f"{prefix}{name}"
            if name not in fields:
                raise _unknown(key, where, type(cfg), prefix, whole)
            if dataclasses.is_dataclass(fields[name]):
                apply(getattr(cfg, name), value, where, key + ".", whole, open_sections)
            else:
                setattr(cfg, name, coerce(value, fields[name], key, where))
        return cfg
    for name, value in over.items():
        key = f"{prefix}{name}"
        if name not in cfg:
            raise _unknown(key, where, cfg, prefix, set(whole) | set(open_sections))
        default = cfg[name]
        if key in open_sections:
            if isinstance(value, str) and value:  # an open section may name a file of its own instead
                cfg[name] = value
            elif value is EMPTY or value is None:
                cfg[name] = {}
            elif not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
            else:
                cfg[name] = deep_merge(default or {}, value)
        elif isinstance(default, dict) and default and key not in whole:
            apply(default, value, where, key + ".", whole, open_sections)
        else:
            cfg[name] = coerce(value, _type_of_default(default), key, where)
    return cfg


def deep_merge(base: dict, over: dict) -> dict:
    """A copy of `base` with `over` merged in key by key (no schema: for open sections and includes)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_file(path: str | Path) -> dict:
    """A config file's mapping (an empty file is an empty mapping)."""
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping, got {type(data).__name__}")
    return data


def load(schema, path: str | Path | None = None, sets=(), base: dict | None = None, whole=(), open_sections=()):
    """The config of `schema` (a dataclass class, or a mapping of defaults, copied): its defaults, updated by
    `base` (a mapping, e.g. a recipe's section), then the YAML file at `path`, then the `--set` items."""
    cfg = schema() if isinstance(schema, type) else copy.deepcopy(schema)
    if base:
        apply(cfg, base, "config", whole=whole, open_sections=open_sections)
    if path:
        apply(cfg, read_file(path), str(path), whole=whole, open_sections=open_sections)
    items = parse_set(sets)
    if dataclasses.is_dataclass(cfg):  # `--set grad_accum=2 --set gradient_accumulation_steps=4`: which one?
        spelled: dict[str, str] = {}
        for key, _ in items:
            first = spelled.setdefault(canonical_key(cfg, key), key)
            if first != key:
                raise ConfigError(f"--set {key}: {first} and {key} name the same key "
                                  f"({canonical_key(cfg, key)}); give only one of them")
    for key, value in items:
        apply(cfg, nest(key, value), f"--set {key}", whole=whole, open_sections=open_sections)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else copy.deepcopy(cfg)


def dump(cfg) -> str:
    """The config as YAML, every key with its value (what `--print-config` prints and runs record)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


PRINT_CONFIG_HELP = "Print the resolved config (every key with its value) as YAML and exit."

__all__ = ["ConfigError", "EMPTY", "parse_set", "nest", "coerce", "valid_keys", "aliases", "canonical_key", "alias_help", "apply", "deep_merge", "read_file",
           "load", "to_dict", "dump", "PRINT_CONFIG_HELP"]
