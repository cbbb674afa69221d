"""Serving under MLPerf LoadGen: ``--scenario server`` and ``--scenario offline``.

One LoadGen per rank, each over its share of the traffic, as behind a load balancer
(``--target-qps`` is the job's total; every rank's LoadGen offers ``Q / P``).  A rank
holds only the queries its LoadGen issued and distributes their sparse indices to the
table owners (input_dist.py); the embedding exchange is the closed loop's.

Each step a rank batches the queries that have arrived, up to ``--batch-size``, or
fewer once the oldest has waited ``--max-wait-ms``; with none it still takes part in
the step's exchanges with an empty batch after ``--max-wait-ms``.  The lengths
message of every step carries a flag word, "my LoadGen has finished and my queue is
empty"; all ranks read the same flags in the same step, so they stop together.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Sequence, Tuple

import numpy as np
import torch

from .config import STREAM_DELAY, rng
from .input_dist import DEFAULT_CHAIN_BYTES, LocalInputs, offsets_of
from .report import write_json
from .runner import Pipeline, RankResult

SCENARIOS = ("server", "offline")
SERVING_DEFAULTS: Dict[str, Any] = {
    "max_wait_ms": 2.0, "duration_s": 10.0, "target_latency_ms": 30.0, "follow_peers": True,
    "loadgen_dir": "mlperf_logs", "num_batches": 8,
}
DEFAULT_SERVER_QPS = 2000.0   # --target-qps when not given (the job's total)
SERVING_POLL_US = 50.0        # --poll-us when serving
POLL_S = 100e-6               # how often an idle rank looks at its queue


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The serving and input-distribution flags (one place, so cli.py stays small)."""
    g = p.add_argument_group("input distribution and serving (MLPerf LoadGen)")
    g.add_argument("--input-dist", action="store_true", default=None,
                   help="each rank holds only its own samples and sends their sparse "
                        "indices to the table owners (always on with --scenario)")
    g.add_argument("--chain-bytes", type=int, metavar="N",
                   help=f"bls: post a step's lengths and indices messages as one "
                        f"comm.chain() when each message to a peer fits in N bytes "
                        f"({DEFAULT_CHAIN_BYTES}; 0: never)")
    g.add_argument("--input-lag", type=int, metavar="L",
                   help="nonblocking backends: pool a batch's embeddings L steps after "
                        "its input distribution started (1, as torchrec's pipeline; "
                        "serving: 0)")
    g.add_argument("--scenario", choices=SCENARIOS,
                   help="serve queries from MLPerf LoadGen instead of a closed loop")
    g.add_argument("--target-qps", metavar="Q[,Q]",
                   help=f"server: queries per second offered to the whole job, split "
                        f"evenly over ranks; offline: the expected QPS "
                        f"({DEFAULT_SERVER_QPS:g}); a list runs each in turn")
    g.add_argument("--max-wait-ms", type=float, metavar="MS",
                   help="serve a partial batch once its oldest query waited MS (2)")
    g.add_argument("--follow-peers", action=argparse.BooleanOptionalAction, default=None,
                   help="server: post a partial batch at once when a peer has already "
                        "posted the step (it waits for this rank); bls only, where a "
                        "peer's write is visible before this rank posts (on)")
    g.add_argument("--duration-s", type=float, metavar="S",
                   help="LoadGen's minimum duration (10; MLPerf's 600 is allowed)")
    g.add_argument("--target-latency-ms", type=float, metavar="MS",
                   help="server: LoadGen's 99th-percentile latency bound (30)")
    g.add_argument("--loadgen-dir", metavar="DIR",
                   help="LoadGen logs go to DIR/<run>/rank<r>/ (mlperf_logs)")


def fill_defaults(args: argparse.Namespace) -> None:
    """Serving defaults, only in serving mode (explicit flags win)."""
    if args.input_dist is None:
        args.input_dist = bool(args.scenario)
    if args.chain_bytes is None:
        args.chain_bytes = DEFAULT_CHAIN_BYTES
    if not args.scenario:
        if args.input_lag is None:
            args.input_lag = 1
        return
    # A server syncs on every step's inputs anyway (a query needs every table), so it
    # pools a batch as soon as its inputs are in; and it waits by test-and-sleep, which
    # leaves the cores to LoadGen and to the ranks that still compute.
    if args.input_lag is None:
        args.input_lag = 0
    if args.poll_us is None:
        args.poll_us = SERVING_POLL_US
    for k, v in SERVING_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.target_qps is None:
        args.target_qps = str(DEFAULT_SERVER_QPS)


def import_loadgen() -> Any:
    try:
        return importlib.import_module("mlperf_loadgen")
    except ImportError as exc:
        raise ValueError(f"--scenario needs MLPerf LoadGen (module mlperf_loadgen), which "
                         f"failed to import ({exc}); pip install mlcommons-loadgen") from None


def validate(args: argparse.Namespace) -> List[float]:
    """Check the serving flags; returns the target QPS values (one run each)."""
    if args.chain_bytes < 0:
        raise ValueError(f"--chain-bytes must be >= 0, got {args.chain_bytes}")
    if args.input_lag < 0:
        raise ValueError(f"--input-lag must be >= 0, got {args.input_lag}")
    if not args.scenario:
        for flag in ("target_qps", "max_wait_ms", "duration_s", "target_latency_ms",
                     "loadgen_dir", "follow_peers"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} applies to --scenario server "
                                 f"or offline")
        return []
    try:
        qps = [float(q) for q in str(args.target_qps).split(",") if q.strip()]
    except ValueError:
        raise ValueError(f"--target-qps expects numbers Q or Q1,Q2,...; got "
                         f"{args.target_qps!r}") from None
    bad = [q for q in qps if not q > 0 or not np.isfinite(q)]
    if not qps or bad:
        raise ValueError(f"--target-qps must be > 0 queries per second, got {args.target_qps!r}")
    if not args.max_wait_ms >= 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if not args.duration_s > 0:
        raise ValueError(f"--duration-s must be > 0 seconds, got {args.duration_s}")
    if not args.target_latency_ms > 0:
        raise ValueError(f"--target-latency-ms must be > 0, got {args.target_latency_ms}")
    if args.launcher != "mpi":
        raise ValueError("--scenario runs under mpirun (--launcher mpi)")
    import_loadgen()
    return qps


# ------------------------------------------------------------------ the samples

class SampleLibrary:
    """Every sample of the source, addressable by LoadGen's sample index: sample ``k`` is
    row ``k % batch_size`` of batch ``k // batch_size``, the same sample the closed loop
    predicts at position ``k`` of ``--save-predictions``."""

    def __init__(self, source: Any, num_tables: int) -> None:
        dense, idx, lens = [], [[] for _ in range(num_tables)], [[] for _ in range(num_tables)]
        for b in range(source.num_batches):
            n = source.size_of(b)
            lb = source.local_batch(b, range(num_tables), 0, n)
            dense.append(lb.dense)
            for t, (ix, off) in lb.sparse.items():
                ends = np.append(off[1:], len(ix))
                idx[t].append(ix)
                lens[t].append(ends - off)
        self.dense = np.ascontiguousarray(np.concatenate(dense))
        self.count = len(self.dense)
        self.indices = [np.concatenate(v) for v in idx]
        self.starts = []
        for t in range(num_tables):
            ln = np.concatenate(lens[t])
            self.starts.append(np.append(offsets_of(ln), int(ln.sum())))

    def gather(self, ids: np.ndarray) -> LocalInputs:
        """The dense rows and every table's bags of samples ``ids``, in that order."""
        bags = {}
        for t, (ix, st) in enumerate(zip(self.indices, self.starts)):
            first, lengths = st[ids], st[ids + 1] - st[ids]
            if len(ids) and (lengths == 1).all():
                picked = ix[first]
            else:
                total = int(lengths.sum())
                pos = np.repeat(first - offsets_of(lengths), lengths) + np.arange(total)
                picked = ix[pos]
            bags[t] = (lengths.astype(np.int64), np.ascontiguousarray(picked))
        return LocalInputs(np.ascontiguousarray(self.dense[ids]), bags)


# ------------------------------------------------------------------ LoadGen glue

class QueryQueue:
    """The SUT LoadGen calls into (from its own thread): queries wait here."""

    def __init__(self) -> None:
        self.queue: Deque[Tuple[int, int, float]] = deque()  # (query id, sample, arrival)
        self.issued = 0

    def issue(self, samples: Sequence[Any]) -> None:
        now = time.perf_counter()
        for s in samples:
            self.queue.append((s.id, s.index, now))
        self.issued += len(samples)

    def flush(self) -> None:
        pass


def parse_summary(path: str) -> Dict[str, Any]:
    """The verdict, throughput and latency percentiles of ``mlperf_log_summary.txt``."""
    out: Dict[str, Any] = {"path": path}
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        return {"path": path, "error": str(exc)}
    m = re.search(r"Result is\s*:\s*(\w+)", text)
    out["verdict"] = m.group(1) if m else "UNKNOWN"
    m = re.search(r"(?:Completed samples per second|Samples per second)\s*:\s*([\d.eE+-]+)", text)
    out["qps"] = float(m.group(1)) if m else None
    m = re.search(r"Performance constraints satisfied\s*:\s*(\w+)", text)
    out["latency_ok"] = (m.group(1).lower() == "yes") if m else None
    pct = {}
    for q, ns in re.findall(r"([\d.]+) percentile latency \(ns\)\s*:\s*(\d+)", text):
        pct[f"p{float(q):g}"] = int(ns) / 1e6
    for name in ("Min", "Max", "Mean"):
        m = re.search(rf"{name} latency \(ns\)\s*:\s*(\d+)", text)
        if m:
            pct[name.lower()] = int(m.group(1)) / 1e6
    out["latency_ms"] = pct
    return out


@dataclass
class ServeResult:
    """What one rank measured in one serving run (gathered to rank 0)."""

    rank: int
    issued: int = 0
    answered: int = 0
    steps: int = 0
    empty_steps: int = 0
    wall_s: float = 0.0
    blocked_s: float = 0.0
    slept_s: float = 0.0
    latency_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # arrival -> response
    queued_s: np.ndarray = field(default_factory=lambda: np.zeros(0))   # arrival -> its batch
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    preds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    loadgen: Dict[str, Any] = field(default_factory=dict)
    backend_stats: Dict[str, Any] = field(default_factory=dict)


class Server:
    """One rank's serving loop for one run (backend, bound, target QPS)."""

    def __init__(self, runner: Any, library: SampleLibrary, args: argparse.Namespace) -> None:
        self.runner = runner
        self.library = library
        self.args = args
        self.rank, self.size = runner.rank, runner.size

    def _settings(self, lg: Any, qps: float) -> Any:
        args = self.args
        ts = lg.TestSettings()
        ts.mode = lg.TestMode.PerformanceOnly
        ts.min_duration_ms = int(args.duration_s * 1000)
        ts.min_query_count = 1
        # independent arrivals on every rank (LoadGen seeds are uint64)
        seed = (int(args.seed) * 1000003 + self.rank * 7919 + 1) & 0xFFFFFFFF
        ts.schedule_rng_seed = seed
        ts.sample_index_rng_seed = seed + 1
        ts.qsl_rng_seed = seed + 2
        if args.scenario == "server":
            ts.scenario = lg.TestScenario.Server
            ts.server_target_qps = qps / self.size
            ts.server_target_latency_ns = int(args.target_latency_ms * 1e6)
        else:
            ts.scenario = lg.TestScenario.Offline
            ts.offline_expected_qps = qps / self.size
        return ts

    def run(self, spec: Any, backend: Any, qps: float, logdir: str) -> ServeResult:
        lg = import_loadgen()
        args, res = self.args, ServeResult(self.rank)
        os.makedirs(logdir, exist_ok=True)
        queries = QueryQueue()
        sut = lg.ConstructSUT(queries.issue, queries.flush)
        qsl = lg.ConstructQSL(self.library.count, self.library.count,
                              lambda s: None, lambda s: None)
        log = lg.LogSettings()
        log.log_output.outdir = logdir
        log.log_output.copy_summary_to_stdout = False
        log.enable_trace = False
        step_res = RankResult(rank=self.rank)
        latency: List[float] = []
        queued: List[float] = []
        ids: List[int] = []
        preds: List[np.ndarray] = []

        def respond(p: Any, pred: torch.Tensor) -> None:
            if p.tag is None:
                return
            t_taken, batch, _ = p.tag
            now = time.perf_counter()
            values = np.ascontiguousarray(pred.numpy(), dtype=np.float32)
            base = values.ctypes.data  # LoadGen copies what it logs during the call
            lg.QuerySamplesComplete([lg.QuerySampleResponse(qid, base + 4 * i, 4)
                                     for i, (qid, _, _) in enumerate(batch)])
            res.answered += len(batch)
            latency.extend(now - t for _, _, t in batch)
            queued.extend(t_taken - t for _, _, t in batch)
            if args.save_predictions:
                ids.extend(k for _, k, _ in batch)
                preds.append(values)

        def compute(tag: Any) -> None:
            """A batch's injected delay, paid once its inputs are in, before it is pooled."""
            if tag is not None and tag[2] > 0:
                t = time.perf_counter()
                time.sleep(tag[2])
                res.slept_s += time.perf_counter() - t

        try:
            with torch.inference_mode():
                self._warm_up(spec, backend)
                backend.quiesce()
                self.runner.comm.Barrier()
                tester = threading.Thread(
                    target=lg.StartTestWithLogSettings, args=(sut, qsl, self._settings(lg, qps),
                                                              log), daemon=True)
                t0 = time.perf_counter()
                tester.start()
                pipe = Pipeline(self.runner, spec, backend, step_res, True, respond, compute)
                self._serve(spec, pipe, queries, tester, res)
                res.wall_s = time.perf_counter() - t0
                tester.join(timeout=max(60.0, args.timeout))
                if tester.is_alive():
                    raise TimeoutError(f"rank {self.rank}: LoadGen did not finish after the "
                                       f"last response")
        finally:
            lg.DestroyQSL(qsl)
            lg.DestroySUT(sut)
        res.issued = queries.issued
        res.latency_s = np.asarray(latency, dtype=np.float64)
        res.queued_s = np.asarray(queued, dtype=np.float64)
        res.ids = np.asarray(ids, dtype=np.int64)
        res.preds = np.concatenate(preds) if preds else np.zeros(0, np.float32)
        res.blocked_s = step_res.blocked_s
        res.loadgen = parse_summary(os.path.join(logdir, "mlperf_log_summary.txt"))
        res.backend_stats = backend.stats()
        return res

    def _warm_up(self, spec: Any, backend: Any) -> None:
        pipe = Pipeline(self.runner, spec, backend, RankResult(rank=self.rank), False)
        n = min(self.args.batch_size, self.library.count)
        for _ in range(self.args.warmup):
            pipe.push_inputs(-1, self.library.gather(np.arange(n)), 0, time.perf_counter())
            pipe.complete()
        pipe.drain()

    def _serve(self, spec: Any, pipe: Any, queries: QueryQueue, tester: threading.Thread,
               res: ServeResult) -> None:
        args = self.args
        wait_s, cap = args.max_wait_ms / 1000.0, int(args.batch_size)
        follow = bool(args.follow_peers)
        delays = rng(args.seed, STREAM_DELAY, self.rank) if spec.delay_ms else None
        slow = spec.slow_ms / 1000.0 if spec.slow_rank == self.rank else 0.0
        limit = time.monotonic() + 10 * args.duration_s + max(args.timeout, 60.0)
        q = queries.queue
        step = 0
        while True:
            t_step = time.perf_counter()
            # batch what has arrived: a full batch, or, once no earlier step still waits
            # for a peer, the oldest query waited long enough or a peer has already
            # posted this step. (A rank ahead of the others gains nothing by posting:
            # its queries would wait for them anyway, so it keeps batching; a rank
            # behind them holds their queries up, so it goes at once. A full batch
            # goes at once, within the bound.)
            while len(q) < cap and tester.is_alive():
                pipe.complete()  # eager: answer finished batches while waiting
                start = q[0][2] if q else t_step
                if not pipe.fifo and (time.perf_counter() >= start + wait_s
                                      or (follow and pipe.backend.peers_waiting())):
                    break
                time.sleep(POLL_S)
            batch = [q.popleft() for _ in range(min(cap, len(q)))]
            # The injected delay models this rank's compute on its batch: drawn every
            # step (the stream stays aligned), paid only with queries to compute on,
            # when the batch is computed (see compute below).
            pause = slow
            if delays is not None:
                pause += float(delays.uniform(spec.delay_ms[0], spec.delay_ms[1])) / 1000.0
            t_taken = time.perf_counter()
            finished = not tester.is_alive() and not q and not batch
            ids = np.fromiter((k for _, k, _ in batch), dtype=np.int64, count=len(batch))
            pipe.push_inputs(step, self.library.gather(ids), 0, t_step,
                             (t_taken, batch, pause) if batch else None,
                             flag=int(finished))
            pipe.complete()
            step += 1
            res.steps += 1
            res.empty_steps += not batch
            if pipe.flags and all(f == 1 for f in pipe.flags):
                break
            if time.monotonic() > limit:
                raise TimeoutError(f"rank {self.rank}: serving did not end within "
                                   f"{10 * args.duration_s:g} s + timeout; ranks whose "
                                   f"LoadGen was still running at the last step: "
                                   f"{[r for r, f in enumerate(pipe.flags) if f != 1]}")
        pipe.drain()


# ------------------------------------------------------------------ reporting

def summarize(spec: Any, qps: float, ranks: List[Dict[str, Any]], scenario: str) -> Dict[str, Any]:
    """One serving run over every rank: LoadGen's verdicts, QPS and latencies."""
    lgs = [r["loadgen"] for r in ranks]
    verdicts = [l.get("verdict", "UNKNOWN") for l in lgs]
    worst: Dict[str, float] = {}
    for l in lgs:
        for k, v in (l.get("latency_ms") or {}).items():
            worst[k] = max(worst.get(k, v), v)
    def pct(key: str) -> Dict[str, float]:
        v = np.concatenate([np.asarray(r[key], dtype=np.float64) for r in ranks]) * 1000.0
        return {f"p{q}": float(np.percentile(v, q)) for q in (50, 90, 95, 99)} if len(v) else {}
    own_pct = pct("latency_s")
    steps = sum(r["steps"] for r in ranks)
    per_step = lambda key: sum(r[key] for r in ranks) / max(steps, 1) * 1000.0  # noqa: E731
    return {
        "label": spec.label or spec.describe(),
        "backend": spec.backend, "bound": spec.bound, "scenario": scenario,
        "delay_ms": list(spec.delay_ms) if spec.delay_ms else None,
        "target_qps": qps,
        "verdict": "VALID" if all(v == "VALID" for v in verdicts) else "INVALID",
        "verdict_by_rank": verdicts,
        "latency_ok": all(bool(l.get("latency_ok")) for l in lgs),
        "achieved_qps": float(sum(l.get("qps") or 0.0 for l in lgs)),
        "latency_ms": worst,  # LoadGen's percentiles, worst rank
        "query_latency_ms": own_pct,  # arrival -> response over every query of every rank
        # where a query's time goes: waiting for its batch (the step's injected delay
        # and batching), then its step (input and embedding exchanges, compute); and per
        # step, the injected delay and the waits on peers
        "breakdown_ms": {"queued": pct("queued_s"), "lag_ms_per_step": per_step("blocked_s"),
                         "delay_ms_per_step": per_step("slept_s")},
        "issued": int(sum(r["issued"] for r in ranks)),
        "answered": int(sum(r["answered"] for r in ranks)),
        "steps_per_rank": steps / max(len(ranks), 1),
        "empty_step_fraction": sum(r["empty_steps"] for r in ranks) / max(steps, 1),
        "mean_batch": sum(r["answered"] for r in ranks) / max(steps, 1),
        "wall_s": max(r["wall_s"] for r in ranks),
        "logs": [l.get("path") for l in lgs],
    }


def format_summary(s: Dict[str, Any]) -> str:
    lat, own = s["latency_ms"], s["query_latency_ms"]

    def ms(d: Dict[str, float], k: str) -> str:
        return f"{d[k]:.2f}" if k in d else "-"
    rows = [
        ("run", f"{s['label']}  --scenario {s['scenario']} --target-qps {s['target_qps']:g}"),
        ("LoadGen verdict", f"{s['verdict']} (ranks: {', '.join(s['verdict_by_rank'])})"),
        ("achieved QPS", f"{s['achieved_qps']:.1f} (sum over ranks)"),
        ("latency (LoadGen, worst rank)", f"p50 {ms(lat, 'p50')}  p90 {ms(lat, 'p90')}  "
                                          f"p95 {ms(lat, 'p95')}  p99 {ms(lat, 'p99')}  ms"),
        ("latency (every query)", f"p50 {ms(own, 'p50')}  p95 {ms(own, 'p95')}  "
                                  f"p99 {ms(own, 'p99')}  ms"),
        ("where the time goes", f"queued for a batch p50 {ms(s['breakdown_ms']['queued'], 'p50')}"
                                f"  p99 {ms(s['breakdown_ms']['queued'], 'p99')} ms; per step: "
                                f"delay {s['breakdown_ms']['delay_ms_per_step']:.2f}, waits "
                                f"{s['breakdown_ms']['lag_ms_per_step']:.2f} ms"),
        ("queries", f"{s['issued']} issued, {s['answered']} answered; mean batch "
                    f"{s['mean_batch']:.1f}, {100 * s['empty_step_fraction']:.0f}% empty steps"),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line])


def format_table(summaries: List[Dict[str, Any]]) -> str:
    """One line per serving run."""
    head = ["run", "target QPS", "achieved", "verdict", "p50", "p95", "p99", "mean batch"]
    body = [[s["label"], f"{s['target_qps']:g}", f"{s['achieved_qps']:.1f}", s["verdict"],
             *(f"{s['latency_ms'][q]:.2f}" if q in s["latency_ms"] else "-"
               for q in ("p50", "p95", "p99")), f"{s['mean_batch']:.1f}"] for s in summaries]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])  # noqa: E731
                              for i, c in enumerate(r))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
                     + ["latency: LoadGen's percentiles in ms, worst rank"])


def execute(job: Any, make_backend: Any) -> int:
    """Every (backend, bound, target QPS) in turn; rank 0 reports each."""
    args = job.args
    qps_list = validate(args)
    library = SampleLibrary(job.source, job.arch.num_tables)
    server = Server(job.runner, library, args)
    out: List[Dict[str, Any]] = []
    for i, spec in enumerate(job.runs):
        for qps in qps_list:
            tag = f"{i:02d}_{spec.backend}_k{spec.bound}_{args.scenario}_{qps:g}qps"
            backend = make_backend(spec)
            try:
                res = server.run(spec, backend, qps,
                                 os.path.join(args.loadgen_dir, tag, f"rank{job.rank}"))
            finally:
                backend.close()
            ranks = job.comm.gather(res.__dict__, root=0)
            if job.rank != 0:
                continue
            s = summarize(spec, qps, ranks, args.scenario)
            print(format_summary(s), flush=True)
            out.append({"summary": s, "ranks": [{k: v for k, v in r.items()
                                                  if k not in ("ids", "preds", "latency_s",
                                                               "queued_s")}
                                                 for r in ranks],
                        "responses": (ranks if args.save_predictions else None)})
    if job.rank == 0:
        if len(out) > 1:
            print(format_table([run["summary"] for run in out]), flush=True)
        if args.save_predictions:
            for i, run in enumerate(out):
                ids = np.concatenate([r["ids"] for r in run["responses"]])
                preds = np.concatenate([r["preds"] for r in run["responses"]])
                s = run["summary"]
                path = args.save_predictions.format(backend=s["backend"], bound=s["bound"], run=i)
                with open(path, "wb") as fh:  # exactly this path (np.savez adds .npz)
                    np.savez(fh, ids=ids, preds=preds)
        for run in out:
            run.pop("responses")
        if args.json:
            config = {k: v for k, v in vars(args).items()}
            config.update(world_size=job.comm.Get_size(), tables_per_rank=job.tables,
                          samples_in_library=library.count)
            write_json(args.json, {"config": config, "serving": True, "runs": out})
    return 0
