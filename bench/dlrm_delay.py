"""Per-batch time vs bound k under random per-rank delays, for every backend.

    python bench/dlrm_delay.py            # P=4, --delay-ms 0:10, k = 0..10

Each rank sleeps U[A, B] ms every batch.  The sweep over k runs with --patience-ms 0
(the paper's rule: a fast rank runs the whole bound ahead); one more row shows bls at
the largest bound under the default latency policy (auto).  The baseline row is mpi at k=0, the reference
DLRM's own configuration; every row gives the per-batch time and the start-to-prediction
latency p50/p99.  Then the same with --input-dist (each rank holds only its own samples
and sends their indices to the table owners) at the bounds of --input-dist-bounds, bls
with its lengths and indices chained (the default) and unchained (--chain-bytes 0).
Two reference lines:
  synchronous model = compute + E[max of P uniform delays] = compute + A + (B-A) P/(P+1)
  ideal             = compute + mean delay                 = compute + (A+B)/2
where compute is the smallest per-batch time of the backends in a no-delay run.  Writes
bench/results/dlrm_delay.{json,png}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dlrm_common import (adapter_args, backends_to_run, brief, common_args,  # noqa: E402
                         pyplot, run_job, save_figure, save_json,
                         warn_if_busy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    common_args(p)
    p.add_argument("--delay-ms", default="0:10")
    p.add_argument("--max-bound", type=int, default=10)
    p.add_argument("--backends", default="mpi,mpi-bls,bls")
    p.add_argument("--input-dist-bounds", default="0,8",
                   help="bounds of the --input-dist rows ('' to skip them)")
    a = p.parse_args()
    warn_if_busy()
    lo, hi = (float(v) for v in a.delay_ms.split(":"))
    P = a.ranks
    bounds = ",".join(str(k) for k in range(a.max_bound + 1))

    backends = backends_to_run(a.backends.split(","))
    # compute: per-batch time without delays, at the largest bound, best backend (with more
    # ranks than cores the blocking backend also pays for ranks contending for cores)
    # (and, at k=0, the no-delay baseline of the latency target)
    base = run_job(P, adapter_args(a, ["--backend", ",".join(backends),
                                       "--bound", f"0,{a.max_bound}"]))
    compute_by_backend = {r["summary"]["backend"]: r["summary"]["per_batch_ms"]
                          for r in base["runs"] if r["summary"]["bound"] == a.max_bound}
    no_delay = {(r["summary"]["backend"], r["summary"]["bound"]): brief(r) for r in base["runs"]}
    compute = min(compute_by_backend.values())
    sync = compute + lo + (hi - lo) * P / (P + 1)
    ideal = compute + (lo + hi) / 2

    # The sweep is the paper's experiment: what the bound buys in throughput, so a
    # fast rank runs the whole bound ahead (--patience-ms 0). The latency policy
    # (the default, auto) trades some of it back for latency: one row shows how much.
    series = {}
    for backend in backends:
        job = run_job(P, adapter_args(a, ["--backend", backend, "--bound", bounds,
                                          "--delay-ms", a.delay_ms, "--patience-ms", "0"]))
        series[backend] = [brief(r) for r in job["runs"]]
    policy = {}
    if "bls" in backends:
        job = run_job(P, adapter_args(a, ["--backend", "bls", "--bound", str(a.max_bound),
                                          "--delay-ms", a.delay_ms, "--patience-ms", "auto"]))
        policy = brief(job["runs"][0])
    input_dist = {}
    if a.input_dist_bounds:
        for backend in backends:
            variants = [("", [])] + ([(" unchained", ["--chain-bytes", "0"])]
                                     if backend == "bls" else [])
            for tag, flags in variants:
                job = run_job(P, adapter_args(a, ["--backend", backend, "--input-dist",
                                                  "--bound", a.input_dist_bounds,
                                                  "--delay-ms", a.delay_ms] + flags))
                input_dist[f"{backend} input-dist{tag}"] = [brief(r) for r in job["runs"]]
    digests = {r["sha256"] for runs in series.values() for r in runs}
    digests |= {r["sha256"] for runs in input_dist.values() for r in runs}
    digests |= {policy["sha256"]} if policy else set()
    digests |= {r["summary"]["predictions_sha256"] for r in base["runs"]}

    print("\nno-delay per-batch time: " + ", ".join(f"{b} {v:.2f} ms"
                                                  for b, v in compute_by_backend.items()))
    print(f"compute {compute:.2f} ms   synchronous model {sync:.2f} ms   ideal {ideal:.2f} ms")
    print("per-batch time / latency p50 / p99 (ms)")
    rows = [(f"{b} k={r['bound']}" + (" (reference DLRM)" if (b, r["bound"]) == ("mpi", 0)
                                      else ""), r) for b, runs in series.items() for r in runs]
    rows += [(f"bls k={policy['bound']}, latency policy auto", policy)] if policy else []
    rows += [(f"{name} k={r['bound']}", r) for name, runs in input_dist.items() for r in runs]
    for label, r in rows:
        print(f"  {label:<34} {r['per_batch_ms']:7.2f} / {r['latency_p50_ms']:7.2f} / "
              f"{r['latency_p99_ms']:7.2f}")
    checks = {}
    if "bls" in series and "mpi" in series:
        for k in range(8, a.max_bound + 1):
            bls, mpi = series["bls"][k]["per_batch_ms"], series["mpi"][k]["per_batch_ms"]
            checks[k] = {"bls_over_ideal": bls / ideal, "bls_over_mpi": bls / mpi,
                         "ok": bls <= 1.15 * ideal and bls <= 0.75 * mpi}
            print(f"k={k}: bls/ideal {bls / ideal:.3f} (target <= 1.15), bls/mpi "
                  f"{bls / mpi:.3f} (target <= 0.75) -> {'ok' if checks[k]['ok'] else 'MISSED'}")
    latency_check = None
    if ("bls", a.max_bound) in no_delay and ("mpi", 0) in no_delay:
        ratio = (no_delay["bls", a.max_bound]["latency_p50_ms"]
                 / no_delay["mpi", 0]["latency_p50_ms"])
        latency_check = {"bls_p50_over_mpi_k0_p50": ratio, "ok": ratio <= 2.0}
        print(f"no delay: bls k={a.max_bound} latency p50 / mpi k=0's {ratio:.2f} (target <= 2) "
              f"-> {'ok' if ratio <= 2.0 else 'MISSED'}")
    print("predictions identical in every run:", "yes" if len(digests) == 1 else "NO")

    save_json("dlrm_delay.json", {
        "ranks": P, "delay_ms": [lo, hi], "batch_size": a.batch_size,
        "num_batches": a.num_batches, "rows_cap": a.rows_cap, "poll_us": a.poll_us,
        "compute_ms": compute, "compute_by_backend_ms": compute_by_backend,
        "sync_model_ms": sync, "ideal_ms": ideal,
        "no_delay": [dict(v, bound=k[1]) for k, v in no_delay.items()],
        "latency_target_no_delay": latency_check,
        "series": series, "series_patience_ms": 0, "bls_latency_policy_auto": policy,
        "input_dist": input_dist, "targets_k_ge_8": checks,
        "identical_predictions": len(digests) == 1,
        "config": base["config"],
    })

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ks = list(range(a.max_bound + 1))
    for backend, runs in series.items():
        ax.plot(ks, [r["per_batch_ms"] for r in runs], marker="o", label=backend)
    ax.axhline(sync, color="gray", linestyle="--",
               label=f"synchronous model: compute + E[max of {P}] ({sync:.1f} ms)")
    ax.axhline(ideal, color="black", linestyle=":",
               label=f"ideal: compute + mean delay ({ideal:.1f} ms)")
    ax.set_xlabel("bound k")
    ax.set_ylabel("per-batch time (ms, wall / batches)")
    ax.set_title(f"DLRM inference, P={P}, delay U[{lo:g},{hi:g}] ms per rank and batch")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, "dlrm_delay.png")


if __name__ == "__main__":
    main()
