"""The inference step and the bounded FIFO that lets exchanges lag behind compute.

One step for global batch ``b`` on rank ``r``:

1. (optional) injected delay;
2. ``apply_emb``: pooled embeddings of r's tables for the whole global batch;
3. start the alltoallv that gives every rank all tables for its batch slice;
4. bottom MLP on r's slice while the exchange is in flight;
5. push (handle, bottom output) on a FIFO and finish batches from its head:
   wait, interaction, top MLP -> predictions.  ``complete="eager"`` (the default)
   finishes every head entry whose exchange has already completed, then, like
   ``"lazy"`` (the paper's rule), waits for the oldest while the FIFO holds more
   than ``bound`` entries.  Eager completion changes when a prediction is made,
   never what it is, and never the order of the exchanges;
6. after the last batch, drain the FIFO.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
import torch

from .backends import Backend
from .config import STREAM_DELAY, rng
from .data import LocalBatch, Source
from .model import DLRM
from .report import ProgressBar
from .sharding import ExchangeLayout, batch_slices

# When a finished exchange turns into predictions: as soon as it is done, or only
# when the FIFO is over the bound (the paper's rule).
COMPLETIONS = ("eager", "lazy")


@dataclass(frozen=True)
class RunSpec:
    """One pass over the data with one backend and one bound."""

    backend: str
    bound: int
    num_batches: int
    warmup: int = 0
    delay_ms: Optional[Tuple[float, float]] = None
    slow_rank: Optional[int] = None
    slow_ms: float = 0.0
    label: str = ""
    complete: str = "eager"

    def describe(self) -> str:
        parts = [f"{self.backend} bound={self.bound}"]
        if self.complete != "eager":
            parts.append(f"complete={self.complete}")
        if self.delay_ms:
            parts.append(f"delay={self.delay_ms[0]:g}:{self.delay_ms[1]:g}ms")
        if self.slow_rank is not None and self.slow_ms > 0:
            parts.append(f"slow rank {self.slow_rank} +{self.slow_ms:g}ms")
        return " ".join(parts)


@dataclass
class _Pending:
    batch: int
    handle: Any
    x: torch.Tensor
    lo: int
    t_start: float


@dataclass
class RankResult:
    """What one rank measured in one run (gathered to rank 0 afterwards)."""

    rank: int
    wall_s: float = 0.0
    iter_s: List[float] = field(default_factory=list)
    latency_s: List[float] = field(default_factory=list)
    blocked_s: float = 0.0
    slept_s: float = 0.0
    max_fifo: int = 0
    max_lag: Optional[int] = None
    backend_stats: Dict[str, Any] = field(default_factory=dict)
    preds: Dict[int, np.ndarray] = field(default_factory=dict)


class Runner:
    """Drives ``DLRM`` steps for one rank over a ``Source`` with any ``Backend``."""

    def __init__(self, comm: Any, model: DLRM, layout: ExchangeLayout, source: Source,
                 seed: int, progress: bool = True) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.model = model
        self.layout = layout
        self.source = source
        self.seed = seed
        self.progress = progress and self.rank == 0
        self._inputs: Optional[List[Tuple[int, int, LocalBatch]]] = None

    # -------------------------------------------------------------- inputs

    def _make_input(self, b: int) -> Tuple[int, int, LocalBatch]:
        size = self.source.size_of(b)
        lo, hi = batch_slices(size, self.size)[self.rank]
        return lo, hi, self.source.local_batch(b, self.layout.my_tables, lo, hi)

    def _input(self, b: int) -> Tuple[int, int, LocalBatch]:
        if self._inputs is not None and b < len(self._inputs):
            return self._inputs[b]
        return self._make_input(b)

    def prefetch(self, num_batches: int, limit_bytes: int) -> bool:
        """Materialise this rank's inputs of batches ``0..num_batches-1`` up front, so the
        timed loop measures inference and not input generation; skipped (inputs are then
        made inside each step) when they would take more than ``limit_bytes``."""
        self._inputs = None
        if limit_bytes <= 0 or num_batches < 1:
            return False
        first = self._make_input(0)
        lb = first[2]
        per_batch = lb.dense.nbytes + sum(i.nbytes + o.nbytes for i, o in lb.sparse.values())
        if per_batch * num_batches > limit_bytes:
            return False
        self._inputs = [first] + [self._make_input(b) for b in range(1, num_batches)]
        return True

    # -------------------------------------------------------------- one step

    def _start(self, b: int, backend: Backend, res: RankResult, t0: float) -> _Pending:
        """Steps 2-4: pooled embeddings, start the exchange, bottom MLP (``t0``: step start)."""
        lo, hi, lb = self._input(b)
        size = lb.size
        send = self.model.apply_emb(lb.sparse, size).reshape(-1)
        tc = time.perf_counter()
        handle = backend.start(send, self.layout.sendcounts(size), self.layout.recvcounts(size))
        res.blocked_s += time.perf_counter() - tc
        x = self.model.bottom_rows(torch.from_numpy(lb.dense), lo)
        return _Pending(b, handle, x, lo, t0)

    def _finish(self, p: _Pending, backend: Backend, res: RankResult, keep: bool) -> None:
        """Step 5 for the oldest batch: wait, interaction, top MLP -> predictions."""
        tw = time.perf_counter()
        flat = backend.finish(p.handle)
        res.blocked_s += time.perf_counter() - tw
        ly = self.layout.assemble(flat, p.x.shape[0])
        pred = self.model.top_rows(p.x, ly, p.lo)
        if keep:
            res.preds[p.batch] = pred.numpy().copy()
            res.latency_s.append(time.perf_counter() - p.t_start)

    def _complete(self, fifo: Deque[_Pending], spec: RunSpec, backend: Backend,
                  res: RankResult, keep: bool) -> None:
        """Finish batches at the head of the FIFO: eagerly every one whose exchange is
        done, then (both policies) the oldest while more than ``bound`` are in flight."""
        if spec.complete == "eager":
            while fifo and backend.done(fifo[0].handle):
                self._finish(fifo.popleft(), backend, res, keep)
        elif fifo and not backend.synchronous:
            backend.poke(fifo[0].handle)
        while len(fifo) > spec.bound:
            self._finish(fifo.popleft(), backend, res, keep)

    def _pass(self, spec: RunSpec, backend: Backend, batches: List[int], res: RankResult,
              keep: bool, delays: Optional[np.random.Generator]) -> None:
        fifo: Deque[_Pending] = deque()
        bar = ProgressBar(len(batches), spec.describe(), enabled=self.progress and keep)
        slow = spec.slow_ms / 1000.0 if spec.slow_rank == self.rank else 0.0
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            pause = slow
            if delays is not None and spec.delay_ms is not None:
                pause += float(delays.uniform(spec.delay_ms[0], spec.delay_ms[1])) / 1000.0
            if pause > 0:
                time.sleep(pause)
                if keep:
                    res.slept_s += time.perf_counter() - t0
            fifo.append(self._start(b, backend, res, t0))
            res.max_fifo = max(res.max_fifo, len(fifo))
            self._complete(fifo, spec, backend, res, keep)
            if keep:
                res.iter_s.append(time.perf_counter() - t0)
            bar.update(i + 1)
        while fifo:
            self._finish(fifo.popleft(), backend, res, keep)
        bar.close()

    # -------------------------------------------------------------- a whole run

    def run(self, spec: RunSpec, backend: Backend) -> RankResult:
        """Warm up (untimed, no delays), then time ``spec.num_batches`` batches."""
        if spec.bound < 0:
            raise ValueError(f"--bound must be >= 0, got {spec.bound}")
        if spec.complete not in COMPLETIONS:
            raise ValueError(f"--complete must be one of {', '.join(COMPLETIONS)}; "
                             f"got {spec.complete!r}")
        res = RankResult(rank=self.rank)
        n_src = self.source.num_batches
        with torch.inference_mode():
            if spec.warmup > 0:
                warm = [i % n_src for i in range(spec.warmup)]
                self._pass(spec, backend, warm, RankResult(rank=self.rank), keep=False,
                           delays=None)
            backend.quiesce()  # nothing in flight; no peer may need our polling any more
            self.comm.Barrier()
            delays = rng(self.seed, STREAM_DELAY, self.rank) if spec.delay_ms else None
            t0 = time.perf_counter()
            self._pass(spec, backend, list(range(spec.num_batches)), res, keep=True,
                       delays=delays)
            res.wall_s = time.perf_counter() - t0
        res.max_lag = backend.max_lag()
        res.backend_stats = backend.stats()
        return res
