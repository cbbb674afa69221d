"""ReduceOps, applied on the receiving rank to every rank's copy in rank order."""

from __future__ import annotations

import torch
import torch.distributed as dist

_OP_NAMES = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM")
_INTEGRAL_ONLY = ("BAND", "BOR", "BXOR")

# accumulate(acc, part): acc = acc (op) part, in place.
_ACCUMULATE = {
    "SUM": lambda a, b: a.add_(b),
    "AVG": lambda a, b: a.add_(b),
    "PRODUCT": lambda a, b: a.mul_(b),
    "MIN": lambda a, b: torch.minimum(a, b, out=a),
    "MAX": lambda a, b: torch.maximum(a, b, out=a),
    "BAND": lambda a, b: a.bitwise_and_(b),
    "BOR": lambda a, b: a.bitwise_or_(b),
    "BXOR": lambda a, b: a.bitwise_xor_(b),
}


def reduce_op(opts):
    """The ReduceOp of torch's options (SUM when none are given)."""
    return opts.reduceOp if opts is not None else dist.ReduceOp.SUM


def _op_name(op) -> str:
    for name in _OP_NAMES:
        if op == getattr(dist.ReduceOp, name):
            return name
    return repr(op)


def reducer(op, dtype: torch.dtype, size: int):
    """(accumulate(acc, part) in place, finalize(acc)) for a ReduceOp; raises before posting."""
    name = _op_name(op)
    if name in _INTEGRAL_ONLY and (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"blsfab: ReduceOp.{name} needs an integer or bool tensor; got {dtype}")
    if name == "AVG" and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"blsfab: ReduceOp.AVG needs a floating-point tensor; got {dtype}")
    if name not in _ACCUMULATE:
        raise NotImplementedError(f"blsfab: ReduceOp.{name} is not supported (supported: "
                                  f"{', '.join(_ACCUMULATE)})")
    accumulate = _ACCUMULATE[name]
    if name == "AVG":
        return accumulate, lambda a: a.div_(size)
    return accumulate, lambda a: a


def reduce_rows(parts: torch.Tensor, out: torch.Tensor, accumulate) -> None:
    """out = parts[0] (op) parts[1] (op) ... in rank order: the same bits on every rank."""
    out.copy_(parts[0])
    for r in range(1, parts.shape[0]):
        accumulate(out, parts[r])
