"""Heterogeneous embedding work: pooling 1:100, three placements, every backend.

    python bench/dlrm_hetero.py

Two scenarios (no injected delays):
  table  each table gets its own fixed pooling factor drawn from 1..100
         (--table-pooling 1:100): persistent imbalance between ranks that only
         placement can fix (a bounded lag cannot hide a rank that is always slower);
  bag    every bag draws its length from 1..100 (--pooling 1:100): per-step
         jitter on every rank, the case a bounded lag absorbs.
For each scenario and placement (contiguous, balanced-rows, balanced-cost) one
mpirun job runs the backends in sequence.  Writes bench/results/dlrm_hetero.{json,png}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlrm_common import (adapter_args, backends_to_run, brief, common_args,  # noqa: E402
                         grouped_bars, pyplot, run_job, save_figure, save_json,
                         warn_if_busy)

PLACEMENTS = ["contiguous", "balanced-rows", "balanced-cost"]
SCENARIOS = {"table": ["--table-pooling", "1:100"], "bag": ["--pooling", "1:100"]}


def rank_loads(config: dict) -> list:
    """Expected lookups per sample on each rank under the job's placement."""
    per_table = config["mean_lookups_per_table"]
    return [sum(per_table[t] for t in tables) for tables in config["tables_per_rank"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common_args(p, num_batches=200)
    p.add_argument("--bound", type=int, default=8)
    p.add_argument("--backends", default="mpi,mpi-bls,bls")
    p.add_argument("--scenarios", default="table,bag")
    a = p.parse_args()
    warn_if_busy()
    backends = backends_to_run(a.backends.split(","))
    results = {}
    for scen in a.scenarios.split(","):
        results[scen] = {}
        for placement in PLACEMENTS:
            job = run_job(a.ranks, adapter_args(a, SCENARIOS[scen] + [
                "--placement", placement, "--backend", ",".join(backends),
                "--bound", str(a.bound)]))
            loads = rank_loads(job["config"])
            results[scen][placement] = {"runs": [brief(r) for r in job["runs"]],
                                        "lookups_per_sample_by_rank": loads,
                                        "tables_per_rank": job["config"]["tables_per_rank"]}
            print(f"{scen:>5} {placement:>14}: lookups/sample by rank "
                  f"{[round(v) for v in loads]}  " + "  ".join(
                      f"{r['backend']} {r['per_batch_ms']:.2f} ms"
                      for r in results[scen][placement]["runs"]))
    save_json("dlrm_hetero.json", {"ranks": a.ranks, "bound": a.bound,
                                   "batch_size": a.batch_size, "rows_cap": a.rows_cap,
                                   "num_batches": a.num_batches, "results": results})

    plt = pyplot()
    scens = list(results)
    fig, axes = plt.subplots(1, len(scens), figsize=(6 * len(scens), 4.2), squeeze=False)
    for ax, scen in zip(axes[0], scens):
        runs = results[scen]
        grouped_bars(ax, PLACEMENTS, backends,
                     lambda pl, b, runs=runs: next(r["per_batch_ms"] for r in runs[pl]["runs"]
                                                   if r["backend"] == b),
                     f"pooling 1:100 per {scen}, P={a.ranks}, bound {a.bound}")
    save_figure(fig, "dlrm_hetero.png")

if __name__ == "__main__":
    main()
