"""Posting a payload larger than a slot as several ``ialltoallv`` iterations.

Each poster returns one ``(request, offset, length)`` per round: the round
carries elements ``offset .. offset + length`` of each peer's share. Every rank
computes the same rounds from the same sizes, so every rank posts the same
iterations in the same order, as the bounded-lag engine requires.
"""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch


def step(pg, item: int) -> int:
    """Elements of ``item`` bytes that one message to one peer can hold."""
    n = pg._cap // item
    if n <= 0:
        raise ValueError(f"blsfab: one {item}-byte element does not fit a slot of "
                         f"{pg._cap} bytes; raise BLSFAB_SLOT_BYTES")
    return n


def post_replicated(pg, payload: Optional[torch.Tensor], n: int, dtype: torch.dtype,
                    item: int, dests: Sequence[int]) -> List[tuple]:
    """Send ``payload`` (``n`` elements, or None when this rank sends nothing)
    to every rank in ``dests``. Every rank passes the same ``n`` and ``dests``."""
    per = step(pg, item)
    rounds = max(1, -(-n // per))
    size = pg._size
    sends = payload is not None and len(dests) > 0
    out = []
    for k in range(rounds):
        lo, hi = k * per, min(n, (k + 1) * per)
        counts = [0] * size
        if sends:
            chunk = payload if rounds == 1 else payload[lo:hi]
            buf = chunk if len(dests) == 1 else chunk.repeat(len(dests))
            for d in dests:
                counts[d] = hi - lo
        else:
            buf = torch.empty(0, dtype=dtype)
        out.append((pg._comm.ialltoallv(buf, counts), lo, hi - lo))
    return out


def post_even(pg, payload: torch.Tensor, per_peer: int, item: int) -> List[tuple]:
    """Send segment j of ``payload`` (``size`` segments of ``per_peer``
    elements) to rank j."""
    per = step(pg, item)
    size = pg._size
    if per_peer <= per:
        return [(pg._comm.ialltoallv(payload, [per_peer] * size), 0, per_peer)]
    grid = payload.view(size, per_peer)
    out = []
    for lo in range(0, per_peer, per):
        hi = min(per_peer, lo + per)
        buf = grid[:, lo:hi].contiguous().view(-1)
        out.append((pg._comm.ialltoallv(buf, [hi - lo] * size), lo, hi - lo))
    return out


def requests(rounds: List[tuple]) -> list:
    return [r for r, _, _ in rounds]


def received_rows(rounds: List[tuple], results: list, size: int,
                  error: Callable[[int, int], str]) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """(offset, length, rows) for every non-empty round, ``rows`` being its
    result as ``size`` rows of ``length``; a result of the wrong size raises
    ValueError(error(got, expected))."""
    for (_, lo, m), res in zip(rounds, results):
        if res.numel() != m * size:
            raise ValueError(error(res.numel(), m * size))
        if m:
            yield lo, m, res.view(size, m)
