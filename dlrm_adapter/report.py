"""Progress bar, run summaries, tables and JSON output (rank 0 only)."""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

import numpy as np


class ProgressBar:
    """A one-line ``[#####.....] i/n`` bar on stderr, redrawn at most 10 times a
    second on a terminal; in a log (not a TTY), one line every 5 seconds. With
    ``every`` (the reference DLRM's ``--print-freq``), it draws after every
    ``every``-th batch instead, whatever the time."""

    def __init__(self, total: int, label: str, enabled: bool = True,
                 stream: Optional[TextIO] = None, width: int = 30,
                 every: Optional[int] = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._i = 0
        self._drawn = -1
        self._drawn_once = False
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._every = 0.1 if self._tty else 5.0
        self._every_batches = every

    def update(self, i: int) -> None:
        self._i = i
        if not self.enabled:
            return
        now = time.perf_counter()
        if i < self.total:
            if self._every_batches is not None:
                if i % self._every_batches:
                    return
            elif now - self._last < self._every:
                return
        self._last = now
        self._drawn = i
        fill = int(self.width * i / self.total)
        rate = (now - self.t0) / i * 1000.0 if i else 0.0
        # Redraw in place on a terminal; in a log, one line per update.
        prefix = "\r" if self._tty else ("\n" if self._drawn_once else "")
        self.stream.write(f"{prefix}{self.label} [{'#' * fill}{'.' * (self.width - fill)}] "
                          f"{i}/{self.total} {rate:6.2f} ms/batch")
        self._drawn_once = True
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self._drawn != self._i:
                self._last = 0.0
                self.update(self._i)
            self.stream.write("\n")
            self.stream.flush()


def _pct(values_ms: Sequence[float]) -> Dict[str, float]:
    if len(values_ms) == 0:
        return {"mean": math.nan, "median": math.nan, "p50": math.nan, "p95": math.nan,
                "p99": math.nan}
    a = np.asarray(values_ms, dtype=np.float64)
    p50, p95, p99 = (float(v) for v in np.percentile(a, [50, 95, 99]))
    return {"mean": float(a.mean()), "median": p50, "p50": p50, "p95": p95, "p99": p99}


def digest(preds: np.ndarray) -> str:
    """Short SHA-256 of the predictions' float32 bytes: equal digests = bitwise equal."""
    return hashlib.sha256(np.ascontiguousarray(preds, dtype=np.float32).tobytes()).hexdigest()[:16]


def _patience_ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


def summarize(spec: Any, ranks: List[Dict[str, Any]], samples: int, preds: np.ndarray,
              labels: Optional[np.ndarray], synchronous: bool) -> Dict[str, Any]:
    """Reduce per-rank measurements of one run to the numbers we report."""
    r0 = ranks[0]
    n = len(r0["iter_s"])
    wall = max(r["wall_s"] for r in ranks)
    blocked = [r["blocked_s"] for r in ranks]
    slept = [r["slept_s"] for r in ranks]
    if synchronous:
        lag, lag_source = 0, "synchronous"
    elif r0.get("max_lag") is not None:
        lag, lag_source = max(int(r["max_lag"] or 0) for r in ranks), "blsfab max_lead"
    else:
        lag, lag_source = max(r["max_fifo"] for r in ranks), "FIFO depth"
    out: Dict[str, Any] = {
        "label": spec.label or spec.describe(),
        "backend": spec.backend,
        "bound": spec.bound,
        "delay_ms": list(spec.delay_ms) if spec.delay_ms else None,
        "slow_rank": spec.slow_rank,
        "slow_ms": spec.slow_ms,
        "ranks": len(ranks),
        "batches": n,
        "samples": samples,
        "wall_s": wall,
        "per_batch_ms": wall / n * 1000.0 if n else math.nan,
        "throughput_sps": samples / wall if wall > 0 else math.nan,
        "batch_time_ms": _pct([t * 1000.0 for t in r0["iter_s"]]),
        # every rank's batches: a straggler's latency counts as much as rank 0's
        "latency_ms": _pct([t * 1000.0 for r in ranks for t in r["latency_s"]]),
        "complete": getattr(spec, "complete", "lazy"),
        # the latency policy: None auto (measured), 0 off; and what the ranks measured
        "patience_ms": _patience_ms(getattr(spec, "patience_s", 0.0)),
        "patience_measured_ms": [r.get("patience_s", 0.0) * 1000.0 for r in ranks],
        "patience_waits_ms_per_batch": float(np.mean([r.get("patience_waits_s", 0.0)
                                                      for r in ranks])) / max(n, 1) * 1000.0,
        "blocked_ms_per_batch": {"mean": float(np.mean(blocked)) / max(n, 1) * 1000.0,
                                 "max": float(np.max(blocked)) / max(n, 1) * 1000.0},
        "blocked_s_total": {"mean": float(np.mean(blocked)), "max": float(np.max(blocked))},
        "slept_ms_per_batch": float(np.mean(slept)) / max(n, 1) * 1000.0,
        "compute_ms_per_batch": float(np.mean([(r["wall_s"] - r["blocked_s"] - r["slept_s"])
                                                for r in ranks])) / max(n, 1) * 1000.0,
        "max_lag": lag,
        "lag_source": lag_source,
        "predictions_sha256": digest(preds),
    }
    stats = [r.get("backend_stats") or {} for r in ranks]
    if any("blocked_posts" in s for s in stats):
        out["blocked_posts"] = int(sum(int(s.get("blocked_posts", 0)) for s in stats))
    if labels is not None and len(labels) == len(preds) and len(preds):
        p = np.clip(preds.astype(np.float64), 1e-7, 1 - 1e-7)
        y = labels.astype(np.float64)
        out["logloss"] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        out["accuracy"] = float(np.mean((p >= 0.5) == (y >= 0.5)))
    return out


def format_summary(s: Dict[str, Any]) -> str:
    """The end-of-run table for one run."""
    bt, lat = s["batch_time_ms"], s["latency_ms"]
    rows = [
        ("run", s["label"]),
        ("ranks x batches", f"{s['ranks']} x {s['batches']} ({s['samples']} samples)"),
        ("per-batch time (rank 0)", f"median {bt['median']:.2f}  p95 {bt['p95']:.2f}  "
                                     f"p99 {bt['p99']:.2f}  ms"),
        ("mean per-batch (wall/n)", f"{s['per_batch_ms']:.2f} ms"),
        ("latency start->prediction", f"p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}  "
                                       f"p99 {lat['p99']:.2f}  ms (every rank's batches)"),
        ("throughput", f"{s['throughput_sps']:.0f} samples/s"),
        ("blocked in waits", f"mean {s['blocked_ms_per_batch']['mean']:.2f}  "
                             f"max {s['blocked_ms_per_batch']['max']:.2f}  ms/batch "
                             f"({s['blocked_s_total']['mean']:.2f} s total, mean rank)"),
        ("injected delay", f"{s['slept_ms_per_batch']:.2f} ms/batch (mean rank)"),
        ("largest lag", f"{s['max_lag']} ({s['lag_source']})"),
        ("predictions sha256", s["predictions_sha256"]),
    ]
    if "blocked_posts" in s:
        rows.append(("blocked posts (sum)", str(s["blocked_posts"])))
    if "logloss" in s:
        rows.append(("logloss / accuracy", f"{s['logloss']:.5f} / {s['accuracy']:.4f}"))
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{w}} | {v}" for k, v in rows] + [line])


# The baseline of the comparison table: the first of these that ran.
REFERENCE_BACKENDS = ("mpi", "gloo")


def format_comparison(summaries: List[Dict[str, Any]], ideal_ms: Optional[float] = None,
                      sync_ms: Optional[float] = None) -> str:
    """One row per run; ratios to the ``mpi`` run (``gloo`` when there is no mpi run, as
    under ``--launcher torch``) with the same delay, at bound 0 (the reference DLRM's
    configuration) when it ran, else at the same bound, and, for delayed runs, to the
    ideal model when known."""
    present = {m["backend"] for m in summaries}
    base = next((b for b in REFERENCE_BACKENDS if b in present), "mpi")

    def reference(s: Dict[str, Any]) -> Optional[float]:
        same = [m for m in summaries if m["backend"] == base and m["delay_ms"] == s["delay_ms"]]
        ref0 = [m for m in same if m["bound"] == 0]
        exact = [m for m in same if m["bound"] == s["bound"]]
        pick = (ref0 or exact or same or [None])[0]
        return pick["per_batch_ms"] if pick else None

    head = ["run", "ms/batch", "median", "p95", "p99", "lat p50", "lat p95", "lat p99",
            "samples/s", "blocked", "lag", f"vs {base}", "vs ideal", "sha256"]
    body = []
    for s in summaries:
        bt = s["batch_time_ms"]
        lat = s.get("latency_ms") or {}
        ref = reference(s)
        body.append([
            s["label"], f"{s['per_batch_ms']:.2f}", f"{bt['median']:.2f}", f"{bt['p95']:.2f}",
            f"{bt['p99']:.2f}", *(f"{lat[q]:.2f}" if q in lat else "-" for q in ("p50", "p95", "p99")),
            f"{s['throughput_sps']:.0f}",
            f"{s['blocked_ms_per_batch']['mean']:.2f}", str(s["max_lag"]),
            f"{s['per_batch_ms'] / ref:.2f}x" if ref else "-",
            f"{s['per_batch_ms'] / ideal_ms:.2f}x" if ideal_ms and s["delay_ms"] else "-",
            s["predictions_sha256"][:10],
        ])
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])  # noqa: E731
                              for i, c in enumerate(r))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    lines.append("ms/batch = wall time / batches (throughput); median/p95/p99 = rank 0's "
                 "per-batch time; lat = start of a batch's step to its predictions, every "
                 "rank (what a query waits)")
    if ideal_ms is not None and sync_ms is not None:
        lines.append(f"models: synchronous = compute + E[max of P delays] = {sync_ms:.2f} ms; "
                     f"ideal = compute + mean delay = {ideal_ms:.2f} ms")
    same = len({(s["batches"], s["predictions_sha256"]) for s in summaries}) == 1
    if len({s["batches"] for s in summaries}) == 1:
        lines.append("predictions identical across runs: " + ("yes" if same else "NO"))
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def write_json(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(payload), fh, indent=1)
        fh.write("\n")
