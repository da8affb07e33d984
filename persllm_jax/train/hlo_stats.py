"""What the compiled HLO really multiplies: the operand dtypes of every dot / convolution in an HLO module's text.

The TPU compiler lowers `jnp.dot` to `convolution` (or keeps `dot`); operands are printed by name, so a symbol table
of every instruction's shape (parameters of fused computations included) gives their dtypes. FLOPs per matmul =
2 x output elements x contracted size (the rhs dimensions labelled `i` and any window dimensions, or the
`rhs_contracting_dims` of a dot). Each instruction counts once: a loop body is not multiplied by its trip count,
which is fine for fractions (every layer is the same body).
"""

from __future__ import annotations

import math
import re

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\((.*)$")


def _dims(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def matmul_dtypes(text: str) -> dict:
    """{"by_dtype": {"bf16 x bf16": flops, ...}, "count": n, "bf16_fraction": share of matmul FLOPs with both operands
    bf16}; FLOPs as explained in the module docstring."""
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    matmuls = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op, rest = m.groups()
        shapes[name] = (dtype, _dims(dims))
        if op in ("convolution", "dot"):
            matmuls.append((op, _dims(dims), rest))
    by: dict[str, float] = {}
    for op, out, rest in matmuls:
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        if len(operands) < 2 or operands[0] not in shapes or operands[1] not in shapes:
            continue
        (lt, _), (rt, rshape) = shapes[operands[0]], shapes[operands[1]]
        if op == "dot":
            cd = re.search(r"rhs_contracting_dims=\{([\d,]*)\}", rest)
            k = math.prod(rshape[i] for i in _dims(cd.group(1))) if cd else 1
        else:
            labels = re.search(r"dim_labels=\w*_(\w+)->", rest)
            k = math.prod(n for n, c in zip(rshape, labels.group(1)) if c == "i" or c.isdigit()) if labels else 1
        key = f"{lt} x {rt}"
        by[key] = by.get(key, 0.0) + 2.0 * math.prod(out) * k
    total = sum(by.values())
    return {"by_dtype": {k: by[k] for k in sorted(by, key=lambda k: -by[k])}, "count": len(matmuls),
            "bf16_fraction": by.get("bf16 x bf16", 0.0) / total if total else 0.0}


__all__ = ["matmul_dtypes"]
