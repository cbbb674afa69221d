"""Table placement (model parallel), batch slicing (data parallel) and the exchange layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch

PLACEMENTS = ("contiguous", "balanced-rows", "balanced-cost")


def split_evenly(n: int, parts: int) -> List[int]:
    """``n`` items in ``parts`` parts, the first ``n % parts`` parts one larger (as the reference)."""
    k, m = divmod(n, parts)
    return [k + 1 if i < m else k for i in range(parts)]


def batch_slices(batch_size: int, num_ranks: int) -> List[Tuple[int, int]]:
    """Contiguous ``[lo, hi)`` sample ranges of the global batch, in rank order."""
    out, lo = [], 0
    for n in split_evenly(batch_size, num_ranks):
        out.append((lo, lo + n))
        lo += n
    return out


def _greedy(weights: Sequence[float], num_ranks: int) -> List[List[int]]:
    """Largest weight first onto the least-loaded rank (ties: lower table, lower rank)."""
    order = sorted(range(len(weights)), key=lambda t: (-weights[t], t))
    load = [0.0] * num_ranks
    owned: List[List[int]] = [[] for _ in range(num_ranks)]
    for t in order:
        r = min(range(num_ranks), key=lambda i: (load[i], i))
        owned[r].append(t)
        load[r] += weights[t]
    return [sorted(ts) for ts in owned]


def place_tables(strategy: str, num_ranks: int, table_sizes: Sequence[int],
                 lookups_per_bag: Sequence[float]) -> List[List[int]]:
    """Tables owned by each rank.

    ``contiguous``: blocks in table order, first ranks one extra table.
    ``balanced-rows``: greedy on table rows (memory).
    ``balanced-cost``: greedy on expected lookups per sample (work).
    """
    if num_ranks < 1:
        raise ValueError(f"number of ranks must be >= 1, got {num_ranks}")
    if strategy == "contiguous":
        out, t = [], 0
        for n in split_evenly(len(table_sizes), num_ranks):
            out.append(list(range(t, t + n)))
            t += n
        return out
    if strategy == "balanced-rows":
        return _greedy([float(n) for n in table_sizes], num_ranks)
    if strategy == "balanced-cost":
        if len(lookups_per_bag) != len(table_sizes):
            raise ValueError("balanced-cost needs one lookup count per table")
        return _greedy([float(c) for c in lookups_per_bag], num_ranks)
    raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}; got {strategy!r}")


@dataclass(frozen=True)
class ExchangeLayout:
    """Who sends what in the pooled-embedding alltoallv.

    Rank ``r`` holds pooled embeddings ``E_r`` of shape ``(B, len(tables[r]), d)``
    for the whole global batch.  Since batch slices are contiguous and in rank
    order, ``E_r`` flattened *is* the send buffer: the block for rank ``j`` is rows
    ``slice_j``.  Rank ``r`` receives, in source-rank order, ``(n_r, len(tables[s]), d)``
    from every source ``s``.
    """

    tables: Tuple[Tuple[int, ...], ...]
    emb_dim: int
    rank: int

    @property
    def size(self) -> int:
        return len(self.tables)

    @property
    def my_tables(self) -> Tuple[int, ...]:
        return self.tables[self.rank]

    def sendcounts(self, batch_size: int) -> List[int]:
        return self.sendcounts_for([hi - lo for lo, hi in batch_slices(batch_size, self.size)])

    def recvcounts(self, batch_size: int) -> List[int]:
        lo, hi = batch_slices(batch_size, self.size)[self.rank]
        return self.recvcounts_for(hi - lo)

    def sendcounts_for(self, rows_per_rank: Sequence[int]) -> List[int]:
        """Send counts when rank ``j`` holds ``rows_per_rank[j]`` samples of the step."""
        per_sample = len(self.my_tables) * self.emb_dim
        return [int(n) * per_sample for n in rows_per_rank]

    def recvcounts_for(self, rows: int) -> List[int]:
        """Receive counts when this rank holds ``rows`` samples of the step."""
        return [int(rows) * len(ts) * self.emb_dim for ts in self.tables]

    def max_message_bytes(self, batch_size: int, itemsize: int = 4) -> int:
        """Largest message any rank sends to any rank for this batch size (all ranks agree)."""
        most_rows = max(hi - lo for lo, hi in batch_slices(batch_size, self.size))
        most_tables = max(len(ts) for ts in self.tables)
        return most_rows * most_tables * self.emb_dim * itemsize

    def arrival_order(self) -> List[int]:
        """Global table ids in the order they arrive (source rank, then owned order)."""
        return [t for ts in self.tables for t in ts]

    def assemble(self, received: Union[torch.Tensor, List[torch.Tensor]],
                 rows: int) -> torch.Tensor:
        """Received data -> ``(rows, num_tables, d)`` in global table order (copies only).
        ``received`` is the flat buffer, or one piece per source rank (views
        into the transport's buffers), gathered here in one copy."""
        order = self.arrival_order()
        num_tables = len(order)
        if isinstance(received, torch.Tensor):
            pieces, offset = [], 0
            for ts in self.tables:
                n = rows * len(ts) * self.emb_dim
                pieces.append(received[offset:offset + n])
                offset += n
            total = received.numel()
        else:
            pieces, total = list(received), sum(p.numel() for p in received)
        if total != rows * num_tables * self.emb_dim or len(pieces) != len(self.tables):
            raise RuntimeError(f"received {total} values from {len(pieces)} ranks, expected "
                               f"{rows} samples x {num_tables} tables x {self.emb_dim}")
        parts = []
        for ts, piece in zip(self.tables, pieces):
            if piece.numel() != rows * len(ts) * self.emb_dim:
                raise RuntimeError(f"received {piece.numel()} values from one rank, expected "
                                   f"{rows} samples x {len(ts)} tables x {self.emb_dim}")
            parts.append(piece.view(rows, len(ts), self.emb_dim))
        stacked = (torch.cat(parts, dim=1) if parts
                   else torch.empty(rows, 0, self.emb_dim))
        if order == list(range(num_tables)):
            return stacked
        inverse = torch.empty(num_tables, dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(num_tables)
        return stacked.index_select(1, inverse)
