"""Command line: ``mpirun -np N python -m dlrm_adapter [options]``, or under
torchrun / by hand with ``--launcher torch`` (see launch.py).

``--backend`` and ``--bound`` take comma-separated lists; every combination is
run in sequence inside the same job (same model, same data), which is how
``--demo`` compares backends in one command.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__, serve
from .backends import BACKENDS, blsfab_available, make_backend, slot_bytes_for
from .config import DATASETS, ModelArch, arch_for
from .data import (CriteoTSVSource, Pooling, ProcessedSource, Source, SyntheticSource,
                   parse_float_range)
from .launch import LAUNCHERS, Launch, LaunchError, check_backends, env_rank, resolve_launcher
from .launch import start as start_launcher
from .model import DLRM, arch_from_state_dict, load_checkpoint
from .reference_flags import (add_reference_flags, apply_reference_flags, arch_flags_given,
                              checkpoint_arch, command_line_arch)
from .report import format_comparison, format_summary, summarize, write_json
from .input_dist import exchanges_per_step, max_lookups_per_bag
from .input_dist import max_message_bytes as input_message_bytes
from .patience import PATIENCE_AUTO, parse_patience
from .runner import COMPLETIONS, RankResult, Runner, RunSpec, check_completion
from .sharding import PLACEMENTS, ExchangeLayout, place_tables

DEFAULTS: Dict[str, Any] = {
    "dataset": "criteo-kaggle", "batch_size": 512, "warmup": 5,
    "seed": 0, "bound": "4", "placement": "contiguous", "pooling": "1",
    "slow_ms": 0.0, "timeout": 60.0, "threads": 1, "chunk": 64, "prefetch_mb": 1024.0,
    "poll_us": 0.0, "complete": "eager", "patience_ms": PATIENCE_AUTO,
}
# --demo: a ~2 minute comparison under random delays (explicit flags still win).
# Both latency policies run (the no-delay runs use the first): off shows what the
# bound buys in throughput, auto what a prediction then waits.
DEMO_DEFAULTS: Dict[str, Any] = {
    "rows_cap": 100000, "batch_size": 256, "num_batches": 800, "warmup": 10,
    "bound": "8", "delay_ms": "0:10", "patience_ms": "auto,0",
}
# --backend when not given, by launcher (plain / --demo).
DEFAULT_BACKENDS = {"mpi": "mpi", "torch": "gloo"}
DEMO_BACKENDS = {"mpi": "mpi,mpi-bls,bls", "torch": "gloo,torch-bls,bls"}


class UsageError(ValueError):
    """A bad option value; identical on every rank, reported once."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dlrm_adapter",
        description="DLRM inference with table-wise sharded embeddings and a bounded-lag "
                    "alltoallv (run under mpirun, or torchrun with --launcher torch).")
    a = p.add_argument
    a("--demo", action="store_true",
      help="compare mpi, mpi-bls and bls (--launcher torch: gloo, torch-bls and bls) under "
           "--delay-ms 0:10 with bound 8 (about a minute with 4 ranks); other flags override "
           "the demo settings")
    g = p.add_argument_group("model and data")
    g.add_argument("--dataset", choices=sorted(DATASETS), help="shapes to use (criteo-kaggle)")
    g.add_argument("--data", metavar="PATH", help="Criteo Kaggle TSV file instead of synthetic data")
    g.add_argument("--rows-cap", type=int, metavar="N", help="cap every table at N rows")
    g.add_argument("--load-model", metavar="PATH",
                   help="facebookresearch/dlrm checkpoint (state_dict or {'state_dict': ...})")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of --load-model (only for trusted files)")
    g.add_argument("--batch-size", type=int, metavar="B", help="global batch size (512)")
    g.add_argument("--num-batches", type=int, metavar="N",
                   help="batches to time (100; with --data: all in the file)")
    g.add_argument("--warmup", type=int, metavar="N", help="untimed warm-up batches (5)")
    g.add_argument("--seed", type=int, help="seed for weights and synthetic data (0)")
    g.add_argument("--zipf", type=float, metavar="ALPHA", help="Zipf indices instead of uniform")
    g.add_argument("--pooling", metavar="L|A:B", help="lookups per bag, fixed or random (1)")
    g.add_argument("--table-pooling", metavar="A:B",
                   help="fixed lookups per bag for each table, drawn once per table from A:B")
    g.add_argument("--chunk", type=int, metavar="M",
                   help="rows per MLP micro-chunk, the unit of row-stable compute (64)")
    g.add_argument("--prefetch-mb", type=float, metavar="MB",
                   help="make each rank's inputs before timing when they fit in MB (1024; "
                        "0: make them inside every step)")
    d = p.add_argument_group("distribution and exchange")
    d.add_argument("--backend", metavar="NAME[,NAME]",
                   help=f"{', '.join(BACKENDS)} (mpi; with --launcher torch: gloo)")
    d.add_argument("--launcher", choices=LAUNCHERS,
                   help="how the ranks start: mpi (mpirun, or one plain process), torch "
                        "(torchrun or hand-started processes with RANK, WORLD_SIZE, MASTER_ADDR, "
                        "MASTER_PORT; no MPI, so no mpi/mpi-bls backends), auto: mpi under an "
                        "MPI launcher, else torch if RANK and WORLD_SIZE are set, else mpi "
                        "(auto)")
    d.add_argument("--bound", metavar="K[,K]", help="exchanges allowed in flight beyond the "
                                                    "current one (4)")
    d.add_argument("--complete", choices=COMPLETIONS,
                   help="eager: turn every finished exchange into predictions at once; lazy: "
                        "only when more than --bound are in flight, the paper's rule (eager)")
    d.add_argument("--patience-ms", metavar="auto|0|MS[,...]",
                   help="latency policy of eager completion, a soft bound: before its "
                        "next step a rank waits up to MS for its exchanges to complete, and "
                        "runs ahead (up to --bound) only past that; auto: 1.5 mean steps "
                        "of the rank's own work, measured; 0: off, ranks run up to --bound "
                        "ahead freely; a list runs each in turn (auto)")
    d.add_argument("--placement", choices=PLACEMENTS, help="table placement (contiguous)")
    d.add_argument("--provider", help="libfabric provider for bls and torch-bls "
                                      "(library default)")
    d.add_argument("--timeout", type=float, help="bls/torch-bls/gloo wait timeout in seconds (60)")
    d.add_argument("--bls-progress", choices=("poll", "thread"),
                   help="blsfab progress mode for bls and torch-bls (library default, see "
                        "BLSFAB_PROGRESS)")
    d.add_argument("--threads", type=int, help="torch threads per rank (1)")
    d.add_argument("--poll-us", type=float, metavar="US",
                   help="nonblocking backends: wait by testing every US microseconds and "
                        "sleeping in between, instead of the library's blocking wait (0: "
                        "blocking wait; serving: 50)")
    s = p.add_argument_group("stragglers")
    s.add_argument("--delay-ms", metavar="A:B", help="every rank sleeps U[A,B] ms per batch")
    s.add_argument("--slow-rank", type=int, metavar="R", help="rank that is persistently slow")
    s.add_argument("--slow-ms", type=float, metavar="X", help="extra ms per batch on --slow-rank")
    serve.add_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--save-predictions", metavar="PATH",
                   help="rank 0 writes predictions in global sample order (.npy); with several "
                        "runs use {backend}, {bound} or {run} in PATH")
    o.add_argument("--json", metavar="PATH", help="write configuration and results as JSON")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"dlrm_adapter {__version__}")
    add_reference_flags(p)
    return p


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Options with defaults filled in; ``--launcher auto`` is resolved from the environment
    (``args.launcher_auto`` records that), and the default ``--backend`` follows it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_reference_flags(args, parser)
    serve.fill_defaults(args)  # before DEFAULTS: serving has defaults of its own
    for table in ((DEMO_DEFAULTS,) if args.demo else ()) + (DEFAULTS,):
        for k, v in table.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    args.launcher_auto = args.launcher in (None, "auto")
    args.launcher = resolve_launcher(args.launcher or "auto")
    if args.backend is None:
        args.backend = (DEMO_BACKENDS if args.demo else DEFAULT_BACKENDS)[args.launcher]
    return args


# ------------------------------------------------------------------ validation

def _list(text: str, flag: str) -> List[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UsageError(f"{flag} needs at least one value, got {text!r}")
    return items


def _positive(name: str, value: Optional[float], minimum: float = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum:g}, got {value}")


def validate(args: argparse.Namespace, world: int) -> Tuple[List[str], List[int]]:
    backends = _list(args.backend, "--backend")
    for b in backends:
        if b not in BACKENDS:
            raise UsageError(f"--backend must be among {', '.join(BACKENDS)}; got {b!r}")
    try:
        check_backends(args.launcher, backends, args.launcher_auto)
    except LaunchError as exc:
        raise UsageError(str(exc)) from None
    try:
        bounds = [int(b) for b in _list(args.bound, "--bound")]
    except ValueError:
        raise UsageError(f"--bound expects integers K or K1,K2,...; got {args.bound!r}") from None
    if any(b < 0 for b in bounds):
        raise UsageError(f"--bound must be >= 0, got {args.bound!r}")
    _positive("--batch-size", args.batch_size)
    _positive("--num-batches", args.num_batches)
    _positive("--warmup", args.warmup, 0)
    _positive("--seed", args.seed, 0)
    _positive("--threads", args.threads)
    _positive("--chunk", args.chunk)
    _positive("--rows-cap", args.rows_cap)
    _positive("--slow-ms", args.slow_ms, 0)
    _positive("--prefetch-mb", args.prefetch_mb, 0)
    _positive("--poll-us", args.poll_us, 0)
    try:
        args.patience_s = [parse_patience(v) for v in _list(args.patience_ms, "--patience-ms")]
        for v in args.patience_s:
            check_completion(args.complete, v)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.slow_rank is not None and not 0 <= args.slow_rank < world:
        raise UsageError(f"--slow-rank {args.slow_rank} is not a rank of this {world}-rank job")
    if (args.slow_rank is None) != (not args.slow_ms):
        raise UsageError(f"--slow-rank and --slow-ms go together (got --slow-rank "
                         f"{args.slow_rank}, --slow-ms {args.slow_ms:g})")
    if args.table_pooling and args.pooling != "1":
        raise UsageError("use either --pooling or --table-pooling, not both")
    if args.data and args.dataset != "criteo-kaggle":
        raise UsageError(f"--data reads Criteo Kaggle TSV files; --dataset is {args.dataset!r}")
    if args.data and (args.zipf is not None or args.table_pooling or args.pooling != "1"):
        raise UsageError("--zipf/--pooling/--table-pooling apply to synthetic data, not --data")
    if args.load_model and args.rows_cap is not None:
        raise UsageError("--rows-cap cannot be combined with --load-model: the checkpoint fixes "
                         "the table sizes")
    runs = len(backends) * len(bounds) * max(1, len(serve.validate(args)))
    if args.save_predictions:
        try:
            args.save_predictions.format(backend="mpi", bound=0, run=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise UsageError(f"--save-predictions {args.save_predictions!r}: only {{backend}}, "
                             f"{{bound}} and {{run}} may appear in braces ({exc!r})") from None
    if args.save_predictions and runs > 1 and not any(
            f"{{{k}}}" in args.save_predictions for k in ("backend", "bound", "run")):
        raise UsageError(f"{runs} runs would overwrite --save-predictions "
                         f"{args.save_predictions!r}; put {{backend}}, {{bound}} or {{run}} in it")
    return backends, bounds


# ------------------------------------------------------------------ setup

def build_arch(args: argparse.Namespace) -> Tuple[ModelArch, Optional[Dict[str, torch.Tensor]]]:
    spec = DATASETS[args.dataset]
    if not args.load_model:
        return command_line_arch(args, arch_for(spec, args.rows_cap)), None
    state = load_checkpoint(args.load_model, trust=args.trust_checkpoint)
    arch = checkpoint_arch(args, arch_from_state_dict(state))
    if arch_flags_given(args):
        return arch, state
    if arch.num_tables != len(spec.table_sizes) or arch.dense_dim != spec.dense_dim:
        raise UsageError(f"checkpoint {args.load_model!r} has {arch.num_tables} tables and "
                         f"{arch.dense_dim} dense inputs; --dataset {spec.name} has "
                         f"{len(spec.table_sizes)} and {spec.dense_dim}")
    return arch, state


def build_source(args: argparse.Namespace, arch: ModelArch) -> Source:
    if args.data or args.processed_data:
        src = (ProcessedSource(args.processed_data, arch, args.batch_size, args.num_batches,
                               args.max_ind_range) if args.processed_data else
               CriteoTSVSource(args.data, arch, args.batch_size, args.num_batches))
        args.num_batches = src.num_batches
        return src
    if args.num_batches is None:
        args.num_batches = 100
    if args.table_pooling:
        pooling = Pooling.parse(args.table_pooling, per_table=True)
    else:
        pooling = Pooling.parse(args.pooling)
    return SyntheticSource(arch, args.batch_size, args.num_batches, args.seed, pooling, args.zipf)


def plan_runs(args: argparse.Namespace, backends: List[str], bounds: List[int],
              verbose: bool) -> List[RunSpec]:
    delay = parse_float_range(args.delay_ms, "--delay-ms") if args.delay_ms else None
    opts = dict(complete=args.complete, patience_s=args.patience_s[0],
                input_dist=args.input_dist, chain_bytes=args.chain_bytes,
                input_lag=args.input_lag)
    runs: List[RunSpec] = []
    if args.demo:
        needs_blsfab = [b for b in backends if b in ("bls", "torch-bls")]
        if needs_blsfab and not blsfab_available():
            if verbose:
                print(f"demo: blsfab does not import; skipping {', '.join(needs_blsfab)}",
                      flush=True)
            backends = [b for b in backends if b not in needs_blsfab]
        if delay:  # no-delay runs first: they measure the compute the models build on
            for b in backends:
                runs.append(RunSpec(b, bounds[-1], args.num_batches, args.warmup, None,
                                    label=f"{b} bound={bounds[-1]} no delay", **opts))
        if "mpi" in backends and 0 not in bounds:  # the reference DLRM's own configuration
            runs.append(RunSpec("mpi", 0, args.num_batches, args.warmup, delay, args.slow_rank,
                                args.slow_ms or 0.0, **opts))
    for b in backends:
        for k in bounds:
            # the policy only acts where exchanges may stay in flight
            lagging = k > 0 and b != "mpi"
            for patience in args.patience_s if lagging else args.patience_s[:1]:
                runs.append(RunSpec(b, k, args.num_batches, args.warmup, delay, args.slow_rank,
                                    args.slow_ms or 0.0, **dict(opts, patience_s=patience)))
    return runs


def _expected_max_uniform(lo: float, hi: float, p: int) -> float:
    return lo + (hi - lo) * p / (p + 1)


# ------------------------------------------------------------------ main

def _gather_predictions(ranks: List[Dict[str, Any]], n: int) -> np.ndarray:
    parts = [ranks[r]["preds"][b] for b in range(n) for r in range(len(ranks))]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _labels(source: Source, n: int) -> Optional[np.ndarray]:
    if not source.has_labels:
        return None
    return np.concatenate([source.labels(b) for b in range(n)])


@dataclass
class Job:
    """Everything set up for one job: model, data, layout and the runs to make."""

    args: argparse.Namespace
    launch: Launch
    arch: ModelArch
    source: Source
    tables: List[List[int]]
    slot_bytes: int
    runs: List[RunSpec]
    runner: Runner

    @property
    def comm(self) -> Any:
        """The control plane: MPI.COMM_WORLD, or launch.TorchControl under --launcher torch."""
        return self.launch.comm

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()


def setup(args: argparse.Namespace, launch: Launch) -> Job:
    """Validate options, build the model shard and the inputs; no exchange happens here."""
    comm = launch.comm
    rank, size = comm.Get_rank(), comm.Get_size()
    backends, bounds = validate(args, size)
    torch.set_num_threads(args.threads)
    arch, state = build_arch(args)
    source = build_source(args, arch)
    tables = place_tables(args.placement, size, arch.table_sizes, source.mean_lookups())
    layout = ExchangeLayout(tuple(tuple(ts) for ts in tables), arch.emb_dim, rank)
    if state is not None:
        # build_arch already refused any entry the model would not use.
        model = DLRM.from_state_dict(arch, layout.my_tables, state, args.chunk)
    else:
        model = DLRM.from_seed(arch, layout.my_tables, args.seed, args.chunk)
    max_batch = max(source.size_of(b) for b in range(source.num_batches))
    runs = plan_runs(args, backends, bounds, rank == 0)
    runner = Runner(comm, model, layout, source, args.seed, progress=not args.no_progress,
                    input_dist=args.input_dist, print_freq=getattr(args, "print_freq", None))
    longest = max(spec.num_batches for spec in runs)
    args.prefetched = not args.scenario and runner.prefetch(longest, int(args.prefetch_mb * 2**20))
    slot_bytes = slot_bytes_for(layout.max_message_bytes(max_batch))
    if args.input_dist:  # a serving rank may hold a whole --batch-size of samples
        rows = max_batch if args.scenario else -(-max_batch // size)
        slot_bytes = max(slot_bytes, slot_bytes_for(max(
            layout.max_message_bytes(rows * size),
            input_message_bytes(layout, rows, max_lookups_per_bag(source)))))
    if rank == 0:
        cap = f", rows cap {args.rows_cap}" if args.rows_cap else ""
        print(f"dlrm_adapter: {args.dataset}, {arch.num_tables} tables{cap}, {size} rank(s) "
              f"(launcher {launch.name}), global batch {args.batch_size}, placement "
              f"{args.placement}: tables per rank {[len(t) for t in tables]}", flush=True)
    return Job(args, launch, arch, source, tables, slot_bytes, runs, runner)


def backend_for(job: Job, spec: RunSpec) -> Any:
    """The run's backend; blsfab's bound counts collective calls, a step makes several."""
    args = job.args
    calls = exchanges_per_step(spec.backend, spec.input_dist)
    return make_backend(spec.backend, job.launch, spec.bound * calls, job.slot_bytes,
                        args.provider, args.timeout, args.poll_us / 1e6, args.bls_progress)


def execute(job: Job) -> int:
    """Make every run in sequence; rank 0 reports each and then compares them."""
    args, source = job.args, job.source
    summaries: List[Dict[str, Any]] = []
    json_runs: List[Dict[str, Any]] = []
    for i, spec in enumerate(job.runs):
        backend = backend_for(job, spec)
        try:
            res: RankResult = job.runner.run(spec, backend)
        finally:
            backend.close()
        calls = exchanges_per_step(spec.backend, spec.input_dist)
        if res.max_lag and calls > 1:  # blsfab counts calls; report steps
            res.max_lag = -(-res.max_lag // calls)
        ranks = job.comm.gather(res.__dict__, root=0)
        if job.rank != 0:
            continue
        n = spec.num_batches
        preds = _gather_predictions(ranks, n)
        samples = sum(source.size_of(b) for b in range(n))
        s = summarize(spec, ranks, samples, preds, _labels(source, n), backend.synchronous)
        summaries.append(s)
        if args.demo:
            print(f"done: {s['label']}: {s['per_batch_ms']:.2f} ms/batch, latency p50 "
                  f"{s['latency_ms']['p50']:.2f} p99 {s['latency_ms']['p99']:.2f} ms", flush=True)
        else:
            print(format_summary(s), flush=True)
        if args.save_predictions:
            np.save(args.save_predictions.format(backend=spec.backend, bound=spec.bound, run=i),
                    preds)
        json_runs.append({"summary": s, "ranks": [{k: v for k, v in r.items() if k != "preds"}
                                                  for r in ranks]})
    if job.rank == 0:
        _final_report(job, summaries, json_runs)
    return 0


def _final_report(job: Job, summaries: List[Dict[str, Any]],
                  json_runs: List[Dict[str, Any]]) -> None:
    args, size = job.args, job.comm.Get_size()
    models: Dict[str, Any] = {}
    base = [s for s in summaries if s["label"].endswith(" no delay")]
    if base and args.delay_ms:
        lo, hi = parse_float_range(args.delay_ms, "--delay-ms")
        compute = min(s["per_batch_ms"] for s in base)
        models = {"compute_ms": compute, "ideal_ms": compute + (lo + hi) / 2,
                  "sync_ms": compute + _expected_max_uniform(lo, hi, size),
                  "compute_by_backend_ms": {s["backend"]: s["per_batch_ms"] for s in base}}
    if len(summaries) > 1:
        print(format_comparison(summaries, models.get("ideal_ms"), models.get("sync_ms")),
              flush=True)
    if args.json:
        config = dict(vars(args))
        config.update({
            "world_size": size, "arch": job.arch.__dict__, "tables_per_rank": job.tables,
            "mean_lookups_per_table": job.source.mean_lookups(), "slot_bytes": job.slot_bytes,
            "torch": torch.__version__, "python": platform.python_version(),
            "mkl_cbwr": os.environ.get("MKL_CBWR"),
        })
        write_json(args.json, {"config": config, "models": models, "runs": json_runs})


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
    except LaunchError as exc:
        print(f"dlrm_adapter: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if args.launcher == "torch":
        # Refuse MPI backends before connecting to anyone: every rank sees the same options.
        try:
            check_backends(args.launcher, _list(args.backend, "--backend"), args.launcher_auto)
        except (LaunchError, UsageError) as exc:
            if env_rank() in (None, 0):
                print(f"dlrm_adapter: error: {exc}", file=sys.stderr, flush=True)
            return 2
    try:
        launch = start_launcher(args.launcher, float(args.timeout))  # mpi4py after argparse
    except LaunchError as exc:
        print(f"dlrm_adapter: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - e.g. the rendezvous timed out
        where = (f" at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                 if args.launcher == "torch" else "")
        print(f"dlrm_adapter: rank {env_rank()}: --launcher {args.launcher} could not start"
              f"{where}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        return _run(args, launch)
    finally:
        launch.close()


def _run(args: argparse.Namespace, launch: Launch) -> int:
    comm = launch.comm
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        job = setup(args, launch)
    except (ValueError, FileNotFoundError) as exc:
        # Bad options or inputs: every rank hits the same error before any exchange.
        if rank == 0:
            print(f"dlrm_adapter: error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        if args.scenario:
            return serve.execute(job, lambda spec: backend_for(job, spec))
        return execute(job)
    except Exception as exc:  # noqa: BLE001 - one rank failing must not hang the others
        print(f"dlrm_adapter: rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        if size > 1:
            comm.Abort(1)
        return 1
