"""Input distribution: each rank holds only its own samples and sends their sparse
indices to the owners of the tables (torchrec's input distribution, as two alltoallvs).

For one step, rank ``r`` with ``n_r`` samples sends to every rank ``j``:

* a *lengths* message, int64: ``[n_r, flag, lengths of table t for r's samples, for
  every t that j owns]`` -- the two header words reach every rank, even one that owns
  no table, so all ranks learn every rank's batch size (and the serving loop's stop
  flag) in the same step;
* an *indices* message, int64: the indices of those bags, table after table.

Owner ``j`` concatenates what it receives in source-rank order.  Batch slices are in
rank order too, so the result is exactly the ``(indices, offsets)`` that the replicated
mode builds for the whole global batch: the pooled embeddings, and so the predictions,
are bit for bit the same.

With blsfab the two messages of one step travel as one ``comm.chain()`` when they are
small (``chain_bytes``): one write per peer instead of two.  The other backends need
the receive counts up front and exchange them first (``Backend.start_any``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from .sharding import ExchangeLayout

# (lengths (n,), indices (sum of lengths,)) of one table for a rank's own samples.
LocalBags = Tuple[np.ndarray, np.ndarray]
HEADER = 2  # n, flag

# blsfab posts a step's lengths and indices together when each message to a peer
# fits in this many bytes; larger ones go as two writes (default of --chain-bytes).
DEFAULT_CHAIN_BYTES = 16384


@dataclass
class LocalInputs:
    """One rank's own samples of one step."""

    dense: np.ndarray               # (n, dense_dim) float32
    bags: Dict[int, LocalBags]      # every table -> bags of these n samples

    @property
    def rows(self) -> int:
        return int(self.dense.shape[0])


@dataclass
class GlobalBags:
    """What an owner learns from one step's input distribution."""

    rows_per_rank: List[int]              # n_s of every rank
    flags: List[int]                      # the flag word of every rank
    sparse: Dict[int, Tuple[np.ndarray, np.ndarray]]  # owned table -> (indices, offsets)

    @property
    def rows(self) -> int:
        return sum(self.rows_per_rank)


def bags_of_rows(idx: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> LocalBags:
    """The bags of samples ``[lo, hi)`` of a batch given as EmbeddingBag ``(idx, offsets)``."""
    ends = np.empty(len(offsets), dtype=np.int64)
    ends[:-1] = offsets[1:]
    if len(offsets):
        ends[-1] = len(idx)
    lengths = (ends - offsets)[lo:hi]
    start = int(offsets[lo]) if lo < len(offsets) else len(idx)
    return np.ascontiguousarray(lengths), np.ascontiguousarray(idx[start:start + int(lengths.sum())])


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=out[1:])
    return out


class InputDist:
    """Builds, posts and unpacks the two messages of one step for one rank."""

    def __init__(self, layout: ExchangeLayout, num_tables: int, chain_bytes: int) -> None:
        self.layout = layout
        self.num_tables = num_tables
        self.chain_bytes = int(chain_bytes)

    def post(self, backend: Any, local: LocalInputs, flag: int = 0) -> Any:
        """Start both exchanges for ``local``; returns the handle for ``collect``."""
        n = local.rows
        missing = [t for t in range(self.num_tables) if t not in local.bags]
        if missing:
            raise ValueError(f"input distribution needs bags of every table; missing {missing}")
        lengths: List[np.ndarray] = []
        indices: List[np.ndarray] = []
        lcounts: List[int] = []
        icounts: List[int] = []
        for ts in self.layout.tables:
            lengths.append(np.array([n, int(flag)], dtype=np.int64))
            sent = 0
            for t in ts:
                ln, ix = local.bags[t]
                if len(ln) != n:
                    raise ValueError(f"table {t}: {len(ln)} bags for {n} samples")
                lengths.append(np.asarray(ln, dtype=np.int64))
                indices.append(np.asarray(ix, dtype=np.int64))
                sent += len(ix)
            lcounts.append(HEADER + n * len(ts))
            icounts.append(sent)
        lsend = torch.from_numpy(np.concatenate(lengths))
        isend = torch.from_numpy(np.concatenate(indices) if indices
                                 else np.zeros(0, dtype=np.int64))
        chain = 8 * max(a + b for a, b in zip(lcounts, icounts)) <= self.chain_bytes
        return backend.start_inputs(lsend, lcounts, isend, icounts, chain)

    def collect(self, backend: Any, handle: Any) -> GlobalBags:
        """Wait for both exchanges and rebuild the owned tables' bags over the global batch."""
        lrecv, lcounts, irecv, icounts = backend.finish_inputs(handle)
        lflat, iflat = lrecv.numpy(), irecv.numpy()
        mine = self.layout.my_tables
        rows, flags = [], []
        per_table_len: Dict[int, List[np.ndarray]] = {t: [] for t in mine}
        per_table_idx: Dict[int, List[np.ndarray]] = {t: [] for t in mine}
        lo = io = 0
        for s, (lc, ic) in enumerate(zip(lcounts, icounts)):
            block = lflat[lo:lo + lc]
            if lc < HEADER:
                raise RuntimeError(f"rank {s} sent a lengths message of {lc} words; "
                                   f"at least {HEADER} expected")
            n, flag = int(block[0]), int(block[1])
            if n < 0 or lc != HEADER + n * len(mine):
                raise RuntimeError(f"rank {s} sent {lc} length words for {n} samples and "
                                   f"{len(mine)} tables")
            rows.append(n)
            flags.append(flag)
            seg = block[HEADER:].reshape(len(mine), n) if mine else block[HEADER:]
            ipos = io
            for k, t in enumerate(mine):
                ln = seg[k]
                if (ln < 0).any():
                    raise RuntimeError(f"rank {s} sent a negative bag length for table {t}")
                total = int(ln.sum())
                if ipos + total > io + ic:
                    raise RuntimeError(f"rank {s} sent {ic} indices but its lengths need more")
                per_table_len[t].append(ln)
                per_table_idx[t].append(iflat[ipos:ipos + total])
                ipos += total
            if ipos != io + ic:
                raise RuntimeError(f"rank {s} sent {ic} indices, its lengths account for "
                                   f"{ipos - io}")
            lo += lc
            io += ic
        sparse = {}
        for t in mine:
            ln = np.concatenate(per_table_len[t]) if per_table_len[t] else np.zeros(0, np.int64)
            ix = np.concatenate(per_table_idx[t]) if per_table_idx[t] else np.zeros(0, np.int64)
            sparse[t] = (np.ascontiguousarray(ix), offsets_of(ln))
        return GlobalBags(rows, flags, sparse)


def exchanges_per_step(backend: str, input_dist: bool) -> int:
    """Collective calls one step makes: the embedding exchange, plus with input
    distribution the lengths and indices exchanges (blsfab learns receive counts from
    the messages; the others first exchange them, one more call for each)."""
    if not input_dist:
        return 1
    return 3 if backend == "bls" else 5


def max_message_bytes(layout: ExchangeLayout, rows: int, max_lookups: int) -> int:
    """Largest lengths or indices message of one step with at most ``rows`` samples per
    rank and ``max_lookups`` lookups per bag (what the blsfab slots must hold)."""
    most = max((len(ts) for ts in layout.tables), default=0)
    return 8 * max(HEADER + rows * most, rows * most * max_lookups)



def max_lookups_per_bag(source: Any) -> int:
    """Most lookups one bag of ``source`` can have (synthetic pooling; 1 for Criteo files)."""
    pooling = getattr(source, "pooling", None)
    if pooling is None:
        return 1
    per_table = getattr(source, "table_pooling", None)
    return int(max(per_table)) if per_table else int(pooling.hi)
