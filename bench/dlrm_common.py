"""Shared helpers for the bench/dlrm_*.py experiments: launch mpirun jobs, read their JSON."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def env() -> Dict[str, str]:
    """Environment for the ranks: the repository importable, mpirun allowed as root."""
    e = dict(os.environ)
    paths = [str(REPO), str(REPO / "src")] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])
    e["PYTHONPATH"] = os.pathsep.join(paths)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        e.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return e


def bls_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import blsfab"], env=env(), capture_output=True)
    return r.returncode == 0


def warn_if_busy() -> None:
    """Timing on a shared machine is meaningless; say so up front."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores; other work will distort "
              f"the timings", file=sys.stderr)


def run_job(ranks: int, args: Sequence[str], timeout: float = 1800.0,
            mpirun_args: Sequence[str] = ()) -> Dict[str, Any]:
    """Run ``mpirun -np ranks python -m dlrm_adapter args --json tmp`` and return the JSON."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        sys.exit("bench: mpirun not found on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        cmd = [mpirun, "--oversubscribe", "--mca", "btl", "vader,self", *mpirun_args,
               "-np", str(ranks), sys.executable, "-m", "dlrm_adapter", *args,
               "--no-progress", "--json", out]
        print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            sys.exit(f"bench: job failed with exit code {r.returncode}\n{r.stdout[-4000:]}\n"
                     f"{r.stderr[-4000:]}")
        with open(out) as fh:
            result = json.load(fh)
    # The temporary output path says nothing about the run; keep results portable.
    if isinstance(result.get("config"), dict):
        result["config"].pop("json", None)
    return result


def backends_to_run(requested: Sequence[str]) -> List[str]:
    """Drop bls (with a note) when blsfab does not import."""
    out = list(requested)
    if "bls" in out and not bls_available():
        print("note: blsfab does not import; skipping the bls backend", file=sys.stderr)
        out.remove("bls")
    return out


def save_json(name: str, payload: Dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path


def plot_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / name


def pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, name: str) -> None:
    """Lay out, write bench/results/<name> and say so."""
    fig.tight_layout()
    out = plot_path(name)
    fig.savefig(out, dpi=120)
    print(f"wrote {out.relative_to(REPO)}")


def grouped_bars(ax: Any, groups: Sequence[str], backends: Sequence[str], value: Any,
                 title: str) -> None:
    """One bar per backend in each group; ``value(group, backend)`` is its height (ms)."""
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        ax.bar([x + i * width for x in range(len(groups))],
               [value(g, backend) for g in groups], width, label=backend)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels(groups)
    ax.set_ylabel("per-batch time (ms)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def brief(run: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers a plot or table needs from one run summary."""
    s = run["summary"]
    return {"backend": s["backend"], "bound": s["bound"], "per_batch_ms": s["per_batch_ms"],
            "median_ms": s["batch_time_ms"]["median"], "p95_ms": s["batch_time_ms"]["p95"],
            "p99_ms": s["batch_time_ms"]["p99"], "throughput_sps": s["throughput_sps"],
            "blocked_ms": s["blocked_ms_per_batch"]["mean"], "max_lag": s["max_lag"],
            "latency_p50_ms": s["latency_ms"]["p50"], "latency_p95_ms": s["latency_ms"]["p95"],
            "latency_p99_ms": s["latency_ms"]["p99"], "sha256": s["predictions_sha256"]}


def common_args(p: Any, batch_size: int = 256, num_batches: int = 300) -> None:
    """Flags every experiment takes."""
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--num-batches", type=int, default=num_batches)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rows-cap", type=int, default=100000)
    p.add_argument("--poll-us", type=float, default=0.0,
                   help="passed to the adapter: test-and-sleep waits for mpi-bls/bls")
    p.add_argument("--extra", default="", help="more adapter flags, one shell-quoted string")


def adapter_args(a: Any, optional: Optional[Sequence[str]] = None) -> List[str]:
    out = ["--batch-size", str(a.batch_size), "--num-batches", str(a.num_batches),
           "--warmup", str(a.warmup), "--rows-cap", str(a.rows_cap)]
    if a.poll_us:
        out += ["--poll-us", str(a.poll_us)]
    return out + list(optional or []) + shlex.split(a.extra)
