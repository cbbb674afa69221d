"""The inference step and the bounded FIFO that lets exchanges lag behind compute.

One step for global batch ``b`` on rank ``r``:

1. (optional) injected delay;
2. ``apply_emb``: pooled embeddings of r's tables for the whole global batch (with
   ``--input-dist``: first send r's own samples' indices to the table owners and
   pool the batch whose inputs were sent ``input_lag`` steps ago, see input_dist.py);
3. start the alltoallv that gives every rank all tables for its batch slice;
4. bottom MLP on r's slice while the exchange is in flight;
5. push (handle, bottom output) on a FIFO and finish batches from its head:
   wait, interaction, top MLP -> predictions.  ``complete="eager"`` (the default)
   finishes every head entry whose exchange has already completed, then, with the
   latency policy (``--patience-ms``, see patience.py), waits for the FIFO to empty
   for at most the rank's patience, and then, like ``"lazy"`` (the paper's
   rule), waits for the oldest while the FIFO holds more than ``bound`` entries.
   Neither changes what a prediction is, nor the order of the exchanges: only when
   a prediction is made;
6. after the last batch, drain the FIFO.

``Pipeline`` holds steps 2-6 for one pass; the closed loop (``Runner``) and the
LoadGen server (serve.py) feed it batches.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np
import torch

from .backends import Backend
from .config import STREAM_DELAY, rng
from .data import LocalBatch, Source
from .input_dist import DEFAULT_CHAIN_BYTES, InputDist, LocalInputs, bags_of_rows
from .model import DLRM
from .patience import Patience
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
    input_dist: bool = False
    chain_bytes: int = DEFAULT_CHAIN_BYTES
    input_lag: int = 1
    patience_s: Optional[float] = 0.0  # None: auto; 0: off (see patience.py)

    def describe(self) -> str:
        parts = [f"{self.backend} bound={self.bound}"]
        if self.complete != "eager":
            parts.append(f"complete={self.complete}")
        elif self.bound > 0 and self.backend != "mpi":  # where the latency policy acts
            p = self.patience_s
            parts.append("patience=" + ("auto" if p is None else f"{p * 1000:g}ms" if p else
                                        "off"))
        if self.input_dist:
            parts.append("input-dist" + ("" if self.chain_bytes > 0 else " unchained"))
        if self.delay_ms:
            parts.append(f"delay={self.delay_ms[0]:g}:{self.delay_ms[1]:g}ms")
        if self.slow_rank is not None and self.slow_ms > 0:
            parts.append(f"slow rank {self.slow_rank} +{self.slow_ms:g}ms")
        return " ".join(parts)


@dataclass
class _Pending:
    """A batch whose embedding exchange is in flight."""

    batch: int
    handle: Any
    x: torch.Tensor
    lo: int
    t_start: float
    tag: Any = None


@dataclass
class _Distributing:
    """A batch whose input distribution is in flight."""

    batch: int
    handle: Any
    dense: np.ndarray
    lo: int
    t_start: float
    tag: Any = None


@dataclass
class RankResult:
    """What one rank measured in one run (gathered to rank 0 afterwards)."""

    rank: int
    wall_s: float = 0.0
    iter_s: List[float] = field(default_factory=list)
    latency_s: List[float] = field(default_factory=list)
    blocked_s: float = 0.0
    patience_waits_s: float = 0.0  # waits of the latency policy (part of blocked_s)
    patience_s: float = 0.0        # the latency policy's last patience
    slept_s: float = 0.0
    max_fifo: int = 0
    max_lag: Optional[int] = None
    backend_stats: Dict[str, Any] = field(default_factory=dict)
    preds: Dict[int, np.ndarray] = field(default_factory=dict)


class Runner:
    """Drives ``DLRM`` steps for one rank over a ``Source`` with any ``Backend``."""

    def __init__(self, comm: Any, model: DLRM, layout: ExchangeLayout, source: Source,
                 seed: int, progress: bool = True, input_dist: bool = False,
                 print_freq: Optional[int] = None) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.model = model
        self.layout = layout
        self.source = source
        self.seed = seed
        self.progress = progress and self.rank == 0
        self.print_freq = print_freq
        # with input distribution a rank's inputs are its own samples' (lengths, indices)
        # of every table; without, whole-batch (indices, offsets) of its own tables
        self.input_dist = input_dist
        self._inputs: Optional[List[Tuple[int, int, LocalBatch]]] = None

    # -------------------------------------------------------------- inputs

    def _make_input(self, b: int) -> Tuple[int, int, LocalBatch]:
        size = self.source.size_of(b)
        lo, hi = batch_slices(size, self.size)[self.rank]
        tables = range(self.model.arch.num_tables) if self.input_dist else self.layout.my_tables
        lb = self.source.local_batch(b, tables, lo, hi)
        if self.input_dist:  # keep only this rank's own samples: (lengths, indices)
            lb.sparse = {t: bags_of_rows(idx, off, lo, hi) for t, (idx, off) in lb.sparse.items()}
        return lo, hi, lb

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

    # -------------------------------------------------------------- one pass

    def _pass(self, spec: RunSpec, backend: Backend, batches: List[int], res: RankResult,
              keep: bool, delays: Optional[np.random.Generator]) -> None:
        pipe = Pipeline(self, spec, backend, res, keep)
        bar = ProgressBar(len(batches), spec.describe(), enabled=self.progress and keep,
                          every=self.print_freq)
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
            lo, _, lb = self._input(b)
            if self.input_dist:
                pipe.push_inputs(b, LocalInputs(lb.dense, lb.sparse), lo, t0)
            else:
                pipe.push_batch(b, lb.sparse, lb.size, lb.dense, lo, t0)
            pipe.complete()
            if keep:
                res.iter_s.append(time.perf_counter() - t0)
            bar.update(i + 1)
        pipe.drain()
        bar.close()

    # -------------------------------------------------------------- a whole run

    def run(self, spec: RunSpec, backend: Backend) -> RankResult:
        """Warm up (untimed, no delays), then time ``spec.num_batches`` batches."""
        if spec.bound < 0:
            raise ValueError(f"--bound must be >= 0, got {spec.bound}")
        if spec.input_dist != self.input_dist:
            raise ValueError(f"this runner was built with input_dist={self.input_dist}; the "
                             f"run asks for {spec.input_dist}")
        if spec.input_lag < 0:
            raise ValueError(f"--input-lag must be >= 0, got {spec.input_lag}")
        check_completion(spec.complete, spec.patience_s)
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


def check_completion(complete: str, patience_s: Optional[float]) -> None:
    """``--complete`` and ``--patience-ms`` (in seconds, None: auto) of a run, one clear
    line when bad; auto goes with either."""
    if complete not in COMPLETIONS:
        raise ValueError(f"--complete must be one of {', '.join(COMPLETIONS)}; "
                         f"got {complete!r}")
    if complete == "lazy" and patience_s:
        raise ValueError(f"--patience-ms {patience_s * 1000:g} needs --complete eager "
                         f"(lazy finishes batches only past the bound); drop one of them")


OnPrediction = Callable[[_Pending, torch.Tensor], None]


class Pipeline:
    """The FIFOs of one pass on one rank.

    ``push_batch`` (replicated inputs) pools, starts the embedding exchange and runs the
    bottom MLP.  ``push_inputs`` (input distribution) starts the input exchanges of a
    batch instead, and turns the batch posted ``input_lag`` pushes earlier into an
    embedding exchange: a fixed schedule, so every rank makes the same collective calls
    in the same order whatever ``complete`` decides.  ``complete`` then finishes batches
    from the head of the embedding FIFO (eager or lazy, see the module docstring).
    """

    def __init__(self, runner: Runner, spec: RunSpec, backend: Backend, res: RankResult,
                 keep: bool, on_prediction: Optional[OnPrediction] = None,
                 before_embed: Optional[Callable[[Any], None]] = None) -> None:
        self.model, self.layout = runner.model, runner.layout
        self.spec, self.backend, self.res, self.keep = spec, backend, res, keep
        self.on_prediction = on_prediction or self._keep_prediction
        self.before_embed = before_embed  # called with a batch's tag once its inputs are in
        self.fifo: Deque[_Pending] = deque()
        self.inputs: Deque[_Distributing] = deque()
        self.input_lag = 0 if backend.synchronous else spec.input_lag
        self.dist = InputDist(runner.layout, runner.model.arch.num_tables, spec.chain_bytes)
        self.flags: List[int] = []  # the flag word of every rank, latest distributed batch
        lazy = spec.complete != "eager" or backend.synchronous
        self.patience = Patience(0.0 if lazy else spec.patience_s)
        self._work_s = 0.0  # compute since the policy last looked, waits excluded
        self._hook_s = 0.0  # time spent in before_embed (an injected delay, say)

    def _blocked(self, t: float) -> None:
        self.res.blocked_s += time.perf_counter() - t

    def _work(self) -> Callable[[], None]:
        """Start timing compute; the returned call adds the time since, waits excluded,
        to the work the latency policy measures its patience by."""
        t, blocked, hooked = time.perf_counter(), self.res.blocked_s, self._hook_s

        def stop() -> None:
            self._work_s += (time.perf_counter() - t - (self.res.blocked_s - blocked)
                             - (self._hook_s - hooked))
        return stop

    def push_batch(self, b: int, sparse: Any, size: int, dense: np.ndarray, lo: int,
                   t0: float, tag: Any = None) -> None:
        """Steps 2-4 with replicated inputs (``t0``: the step's start)."""
        work = self._work()
        send = self.model.apply_emb(sparse, size).reshape(-1)
        self._post(b, send, self.layout.sendcounts(size), self.layout.recvcounts(size), dense,
                   lo, t0, tag)
        work()

    def push_inputs(self, b: int, local: LocalInputs, lo: int, t0: float, tag: Any = None,
                    flag: int = 0) -> None:
        """Start batch ``b``'s input distribution; embed the batch now ``input_lag`` old."""
        work = self._work()
        tc = time.perf_counter()
        handle = self.dist.post(self.backend, local, flag)
        self._blocked(tc)
        self.inputs.append(_Distributing(b, handle, local.dense, lo, t0, tag))
        while len(self.inputs) > self.input_lag:
            self._embed(self.inputs.popleft())
        work()

    def _embed(self, d: _Distributing) -> None:
        tw = time.perf_counter()
        bags = self.dist.collect(self.backend, d.handle)
        self._blocked(tw)
        if self.before_embed is not None:
            th = time.perf_counter()
            self.before_embed(d.tag)
            self._hook_s += time.perf_counter() - th
        self.flags = bags.flags
        n = bags.rows
        if n and self.layout.my_tables:
            send = self.model.apply_emb(bags.sparse, n).reshape(-1)
        else:
            send = torch.empty(n * len(self.layout.my_tables) * self.model.arch.emb_dim)
        rows = bags.rows_per_rank[self.layout.rank]
        if rows != len(d.dense):
            raise RuntimeError(f"input distribution reports {rows} samples for this rank, "
                               f"which holds {len(d.dense)}")
        self._post(d.batch, send, self.layout.sendcounts_for(bags.rows_per_rank),
                   self.layout.recvcounts_for(rows), d.dense, d.lo, d.t_start, d.tag)

    def _post(self, b: int, send: torch.Tensor, sendcounts: List[int], recvcounts: List[int],
              dense: np.ndarray, lo: int, t0: float, tag: Any) -> None:
        tc = time.perf_counter()
        handle = self.backend.start(send, sendcounts, recvcounts)
        self._blocked(tc)
        x = self.model.bottom_rows(torch.from_numpy(dense), lo)
        self.fifo.append(_Pending(b, handle, x, lo, t0, tag))
        self.res.max_fifo = max(self.res.max_fifo, len(self.fifo))

    def complete(self) -> None:
        """Finish batches at the head of the FIFO: eagerly every one whose exchange is
        done, then, with the latency policy, every one that completes within its
        patience, then (every policy) the oldest while more than ``bound``
        are in flight."""
        fifo, backend = self.fifo, self.backend
        if self._work_s > 0:  # once per step: the serving loop calls us more often
            self.patience.note_work(self._work_s)
            self._work_s = 0.0
        if self.spec.complete == "eager":
            while fifo and backend.done(fifo[0].handle):
                self._finish(fifo.popleft())
            if self.patience.enabled:
                self._wait_patiently()
        elif fifo and not backend.synchronous:
            backend.poke(fifo[0].handle)
        while len(fifo) > self.spec.bound:
            self._finish(fifo.popleft())

    def _wait_patiently(self) -> None:
        """The soft bound: before the next step, wait for the FIFO to empty, finishing
        each head as it completes, for at most one patience in all; a FIFO still not
        empty then means a peer is really late, and the rank runs ahead (within the
        hard bound)."""
        fifo = self.fifo
        deadline = time.perf_counter() + self.patience.seconds()
        while fifo:
            tw = time.perf_counter()
            done = self.backend.wait_until(fifo[0].handle, deadline)
            self._blocked(tw)
            self.res.patience_waits_s += time.perf_counter() - tw
            if not done:
                return
            self._finish(fifo.popleft())

    def _finish(self, p: _Pending) -> None:
        """Step 5 for the oldest batch: wait, interaction, top MLP -> predictions."""
        work = self._work()
        tw = time.perf_counter()
        received = self.backend.finish_parts(p.handle)
        self._blocked(tw)
        ly = self.layout.assemble(received, p.x.shape[0])
        pred = self.model.top_rows(p.x, ly, p.lo)
        work()
        self.on_prediction(p, pred)

    def _keep_prediction(self, p: _Pending, pred: torch.Tensor) -> None:
        if self.keep:
            self.res.preds[p.batch] = pred.numpy().copy()
            self.res.latency_s.append(time.perf_counter() - p.t_start)

    def drain(self) -> None:
        """Embed every batch still distributing, then finish every batch."""
        self.res.patience_s = self.patience.seconds()
        while self.inputs:
            self._embed(self.inputs.popleft())
        while self.fifo:
            self._finish(self.fifo.popleft())
