"""Checking tensors and moving their elements to and from 1-D buffers.

Everything travels in the tensors' own dtype (the engine takes any fixed-size
dtype), as 1-D contiguous tensors; counts are in elements. Tensor views cost
microseconds from Python, so the common case (1-D contiguous) makes none.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def check_tensor(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"blsfab: {what} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_cpu:
        raise TypeError(f"blsfab: {what} is on {t.device}; the blsfab backend moves CPU tensors "
                        "only (use a device-specific backend for the others)")
    if t.layout is not torch.strided:
        raise TypeError(f"blsfab: {what} has layout {t.layout}; only dense tensors are supported")


def tensor_list(tensors, name: str) -> List[torch.Tensor]:
    """``tensors`` as a non-empty list of checked tensors."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"blsfab: {name} got no tensors")
    for t in tensors:
        check_tensor(t, f"{name} tensor")
    return tensors


def check_same_dtype(tensors: Sequence[torch.Tensor], name: str) -> torch.dtype:
    """The dtype every one of ``tensors`` has."""
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise TypeError(f"blsfab: {name} tensors must share one dtype")
    return dtype


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D contiguous tensor: ``t`` itself when it is one,
    else a view, else a copy."""
    if t.dim() == 1 and t.is_contiguous():
        return t.detach() if t.requires_grad else t
    view = flat_view(t)
    return view if view is not None else t.detach().contiguous().reshape(-1).clone()


def flat_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` as a 1-D unit-stride tensor sharing its memory, or None."""
    if not t.is_contiguous():
        return None
    view = t.detach().reshape(-1)
    return view if view.numel() == 0 or view.stride(0) == 1 else None


def concat(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The elements of ``tensors``, in order, as one 1-D tensor."""
    return flat(tensors[0]) if len(tensors) == 1 else torch.cat([flat(t) for t in tensors])


class Sink:
    """Where received elements go: ``buf`` (1-D, the dtype of ``dst``),
    written back to ``dst`` by ``flush()`` when ``dst`` has no 1-D view."""

    __slots__ = ("dst", "buf", "direct")

    def __init__(self, dst: torch.Tensor):
        self.dst = dst
        if dst.dim() == 1 and dst.is_contiguous():
            self.buf = dst.detach() if dst.requires_grad else dst
            self.direct = True
            return
        view = flat_view(dst)
        self.direct = view is not None
        self.buf = view if view is not None else torch.empty(dst.numel(), dtype=dst.dtype)

    def flush(self) -> None:
        if not self.direct:
            self.dst.detach().copy_(self.buf.view(self.dst.shape))

    def fill(self, src: torch.Tensor) -> None:
        """Copy the 1-D ``src`` into ``dst``."""
        self.buf.copy_(src)
        if not self.direct:
            self.flush()


def write_back(src: torch.Tensor, tensors: List[torch.Tensor]) -> None:
    """Copy the 1-D ``src`` into ``tensors``, in order."""
    if len(tensors) == 1:
        Sink(tensors[0]).fill(src)
        return
    off = 0
    for t in tensors:
        n = t.numel()
        Sink(t).fill(src[off:off + n])
        off += n
