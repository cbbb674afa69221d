"""Balanced load, no delays: the price of the bounded-lag machinery, mpi vs bls.

    python bench/dlrm_balanced.py

For the criteo-kaggle and ali-ccp shapes one mpirun job per dataset runs mpi,
mpi-bls and bls in sequence (same model, same data).  Target: bls/mpi <= 1.05.
Writes bench/results/dlrm_balanced.{json,png}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlrm_common import (adapter_args, backends_to_run, brief, common_args,  # noqa: E402
                         grouped_bars, pyplot, run_job, save_figure, save_json,
                         warn_if_busy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common_args(p)
    p.add_argument("--bound", type=int, default=8)
    p.add_argument("--backends", default="mpi,mpi-bls,bls")
    p.add_argument("--datasets", default="criteo-kaggle,ali-ccp")
    a = p.parse_args()
    warn_if_busy()
    backends = backends_to_run(a.backends.split(","))
    results = {}
    for ds in a.datasets.split(","):
        job = run_job(a.ranks, adapter_args(a, ["--dataset", ds, "--backend", ",".join(backends),
                                                "--bound", str(a.bound)]))
        runs = [brief(r) for r in job["runs"]]
        mpi = next((r["per_batch_ms"] for r in runs if r["backend"] == "mpi"), None)
        for r in runs:
            r["over_mpi"] = r["per_batch_ms"] / mpi if mpi else None
        results[ds] = runs
        print(f"{ds:>14}: " + "  ".join(
            f"{r['backend']} {r['per_batch_ms']:.2f} ms"
            + (f" ({r['over_mpi']:.3f}x mpi)" if r["over_mpi"] else "") for r in runs))
        bls = next((r for r in runs if r["backend"] == "bls"), None)
        if bls and bls["over_mpi"]:
            ok = bls["over_mpi"] <= 1.05
            print(f"{'':>14}  bls/mpi {bls['over_mpi']:.3f} (target <= 1.05) -> "
                  f"{'ok' if ok else 'MISSED'}")
    save_json("dlrm_balanced.json", {"ranks": a.ranks, "bound": a.bound,
                                     "batch_size": a.batch_size, "rows_cap": a.rows_cap,
                                     "num_batches": a.num_batches, "results": results})

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    grouped_bars(ax, list(results), backends,
                 lambda ds, b: next(r["per_batch_ms"] for r in results[ds] if r["backend"] == b),
                 f"no delays, P={a.ranks}, bound {a.bound}, batch {a.batch_size}")
    save_figure(fig, "dlrm_balanced.png")

if __name__ == "__main__":
    main()
