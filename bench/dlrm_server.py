"""Peak QPS under a p99 latency bound, MLPerf LoadGen server scenario, every backend.

    python bench/dlrm_server.py            # P=4, no delays and --delay-ms 0:10 (~15 min)
    python bench/dlrm_server.py --no-follow   # also bls with --no-follow-peers (~22 min)
    python bench/dlrm_server.py --quick    # a smoke run of the whole pipeline (~2 min)

For mpi (bound 0, the reference DLRM), mpi-bls and bls at every bound of --bounds and
every input lag of --lags (how many steps a rank may post inputs before it pools
them: 0 syncs on every step's inputs, 1 lets delays average out over a step), offer
each QPS of --qps to `python -m dlrm_adapter --scenario server` (one LoadGen per
rank, each over its share) and read LoadGen's 99th-percentile latency (worst rank).
The peak QPS of a configuration is the largest offered QPS whose p99 stays within
--latency-ms (30 ms, the MLPerf DLRM server bound).  Writes
bench/results/dlrm_server.{json,png}: p99 against offered QPS, one panel per delay
setting, and every bound tried.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlrm_common import (backends_to_run, pyplot, run_job, save_figure,  # noqa: E402
                         save_json, warn_if_busy)

DELAYS = {"no delay": None, "delay 0-10 ms": "0:10"}


def sweep(a: argparse.Namespace, backend: str, bounds: List[int], lag: int, follow: bool,
          delay: Optional[str], qps: List[float]) -> List[Dict[str, Any]]:
    """One job: every bound x every offered QPS for one backend, lag and delay setting."""
    args = ["--scenario", "server", "--backend", backend, "--input-lag", str(lag),
            "--follow-peers" if follow else "--no-follow-peers",
            "--bound", ",".join(str(k) for k in bounds),
            "--target-qps", ",".join(f"{q:g}" for q in qps),
            "--duration-s", f"{a.delay_duration_s if delay else a.duration_s:g}",
            "--batch-size", str(a.batch_size),
            "--max-wait-ms", f"{a.max_wait_ms:g}", "--rows-cap", str(a.rows_cap),
            "--num-batches", "8", "--warmup", "5", "--target-latency-ms", f"{a.latency_ms:g}"]
    if delay:
        args += ["--delay-ms", delay]
    with tempfile.TemporaryDirectory() as logs:  # the JSON keeps what the summaries say
        job = run_job(a.ranks, args + ["--loadgen-dir", logs] + a.extra.split())
    out = []
    for run in job["runs"]:
        s = run["summary"]
        out.append({"backend": s["backend"], "bound": s["bound"], "input_lag": lag,
                    "follow_peers": follow,
                    "target_qps": s["target_qps"],
                    "achieved_qps": s["achieved_qps"], "verdict": s["verdict"],
                    "p50_ms": s["latency_ms"].get("p50"), "p99_ms": s["latency_ms"].get("p99"),
                    "mean_batch": s["mean_batch"], "issued": s["issued"],
                    "answered": s["answered"],
                    # where the time went: every query's own latency, the part it queued
                    # for its batch, and per step the injected delay and the waits on peers
                    "query_p99_ms": s["query_latency_ms"].get("p99"),
                    "queued_p50_ms": s["breakdown_ms"]["queued"].get("p50"),
                    "queued_p99_ms": s["breakdown_ms"]["queued"].get("p99"),
                    "delay_ms_per_step": s["breakdown_ms"]["delay_ms_per_step"],
                    "lag_ms_per_step": s["breakdown_ms"]["lag_ms_per_step"],
                    "empty_step_fraction": s["empty_step_fraction"]})
    return out


def peak(points: List[Dict[str, Any]], limit_ms: float) -> float:
    """Largest offered QPS whose p99 is within the bound (0 when none is)."""
    ok = [p["target_qps"] for p in points if p["p99_ms"] is not None and p["p99_ms"] <= limit_ms]
    return max(ok, default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--qps", default="1000,2000,4000,6000,9000,12000",
                   help="offered QPS ladder (the job's total)")
    p.add_argument("--delay-qps", default="100,250,500,1000,2000,4000",
                   help="offered QPS ladder with delays (0-10 ms per step caps the rate much lower)")
    p.add_argument("--bounds", default="1,2,4", help="bounds tried for mpi-bls and bls")
    p.add_argument("--lags", default="0",
                   help="input lags tried for mpi-bls and bls (1 lost at every point tried: "
                        "a query then waits for two steps of the slowest rank)")
    p.add_argument("--no-follow", action="store_true",
                   help="also run bls with --no-follow-peers (each bound), to show what "
                        "posting when a peer already has buys")
    p.add_argument("--duration-s", type=float, default=3.0,
                   help="LoadGen minimum duration of a no-delay point")
    p.add_argument("--delay-duration-s", type=float, default=10.0,
                   help="LoadGen minimum duration of a point with delays: a few hundred "
                        "queries per rank leave the p99 to a handful of them")
    p.add_argument("--batch-size", type=int, default=256, help="largest batch per rank")
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--latency-ms", type=float, default=30.0, help="p99 bound")
    p.add_argument("--rows-cap", type=int, default=20000)
    p.add_argument("--extra", default="", help="more adapter flags")
    p.add_argument("--quick", action="store_true",
                   help="two QPS levels, bound 2, 1 s runs: checks the pipeline, not the numbers")
    a = p.parse_args()
    if a.quick:
        a.qps, a.delay_qps, a.bounds, a.lags = "500,2000", "500", "2", "0,1"
        a.duration_s = a.delay_duration_s = 1.0
    a.qps = [float(q) for q in a.qps.split(",")]
    ladders = {name: a.qps if delay is None else [float(q) for q in a.delay_qps.split(",")]
               for name, delay in DELAYS.items()}
    bounds = [int(k) for k in a.bounds.split(",")]
    lags = [int(k) for k in a.lags.split(",")]
    warn_if_busy()
    load_before = os.getloadavg()
    # (backend, bounds, input lag, --follow-peers); the flag only acts on bls
    configs = [("mpi", [0], 0, True)] + [(b, bounds, lag, True)
                                         for b in backends_to_run(["mpi-bls", "bls"])
                                         for lag in lags]
    if a.no_follow:
        configs += [(b, bounds, lag, False) for b, _, lag, _ in configs if b == "bls"]

    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    peaks: Dict[str, Dict[str, float]] = {}
    for name, delay in DELAYS.items():
        points = [pt for backend, ks, lag, follow in configs
                  for pt in sweep(a, backend, ks, lag, follow, delay, ladders[name])]
        series: Dict[str, List[Dict[str, Any]]] = {}
        for pt in points:
            lag = "" if pt["backend"] == "mpi" else f" lag={pt['input_lag']}"
            lag += "" if pt["follow_peers"] else " no-follow"
            series.setdefault(f"{pt['backend']} k={pt['bound']}{lag}", []).append(pt)
        results[name] = series
        peaks[name] = {label: peak(pts, a.latency_ms) for label, pts in series.items()}

    def best(name: str, backend: str) -> float:
        return max((v for k, v in peaks[name].items() if k.startswith(backend + " ")), default=0.0)

    print(f"\npeak QPS with p99 <= {a.latency_ms:g} ms (LoadGen, worst rank), P={a.ranks}")
    for name in DELAYS:
        print(f"  {name}: " + ", ".join(f"{k} {v:g}" for k, v in peaks[name].items()))
    checks = {}
    d, n = "delay 0-10 ms", "no delay"
    ref_d, ref_n = peaks[d].get("mpi k=0", 0.0), peaks[n].get("mpi k=0", 0.0)
    if any(c[0] == "bls" for c in configs):
        bls_d, bls_n, mb_d = best(d, "bls"), best(n, "bls"), best(d, "mpi-bls")
        checks = {
            "delays: bls / mpi k=0 >= 1.25": bls_d / ref_d if ref_d else None,
            "delays: bls / best mpi-bls >= 1.0": bls_d / mb_d if mb_d else None,
            "no delay: bls / mpi k=0 >= 0.95": bls_n / ref_n if ref_n else None,
        }
        for k, v in checks.items():
            print(f"  {k}: " + ("-" if v is None else f"{v:.2f}"))

    save_json("dlrm_server.json", {
        "ranks": a.ranks, "offered_qps": ladders, "bounds_tried": bounds, "lags_tried": lags,
        "duration_s": a.duration_s, "delay_duration_s": a.delay_duration_s,
        "batch_size_per_rank": a.batch_size,
        "max_wait_ms": a.max_wait_ms, "latency_bound_ms": a.latency_ms, "rows_cap": a.rows_cap,
        "quick": a.quick, "extra": a.extra, "no_follow_series": a.no_follow,
        # the 1/5/15-minute load averages before and after: how quiet the machine was
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "series": results, "peak_qps": peaks, "ratios": checks,
    })
    plt = pyplot()
    fig, axes = plt.subplots(1, len(DELAYS), figsize=(12, 4.5), sharey=True)
    for ax, (name, series) in zip(axes, results.items()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # distinct colours for many series
        for label, pts in series.items():
            pts = sorted(pts, key=lambda q: q["target_qps"])
            ax.plot([q["target_qps"] for q in pts], [q["p99_ms"] for q in pts], marker="o",
                    label=f"{label} (peak {peaks[name][label]:g})",
                    linestyle="-" if label.startswith("bls") else "--")
        ax.axhline(a.latency_ms, color="gray", linestyle=":", label=f"{a.latency_ms:g} ms bound")
        ax.set_xlabel("offered QPS (whole job)")
        ax.set_title(f"LoadGen server, P={a.ranks}, {name}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("p99 latency (ms, LoadGen, worst rank)")
    save_figure(fig, "dlrm_server.png")


if __name__ == "__main__":
    main()
