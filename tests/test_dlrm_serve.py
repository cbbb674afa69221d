"""Eager completion, input distribution and LoadGen serving of the DLRM adapter.

Every prediction is compared with a plain single process's closed loop (no mpirun)
over the same seed and data.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlrm_support import COMMON, adapter_env, needs_mpirun, run_adapter  # noqa: E402


def _importable(module: str) -> bool:
    r = subprocess.run([sys.executable, "-c", f"import {module}"], env=adapter_env(),
                       capture_output=True)
    return r.returncode == 0


BLS = _importable("blsfab")
LOADGEN = _importable("mlperf_loadgen")
ALL_BACKENDS = ["mpi", "mpi-bls"] + (["bls", "torch-bls"] if BLS else []) + ["gloo"]


def _reference(tmp: Path, extra: List[str]) -> np.ndarray:
    out = tmp / "ref.npy"
    run_adapter(COMMON + extra + ["--backend", "mpi", "--bound", "0",
                                  "--save-predictions", str(out)], None)
    preds = np.load(out)
    assert len(np.unique(preds)) > 0.9 * len(preds), "predictions are degenerate"
    return preds


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return _reference(tmp_path_factory.mktemp("ref"), [])


def _runs(report: Path) -> List[Dict]:
    return json.loads(report.read_text())["runs"]


# ------------------------------------------------------------------ eager completion

@needs_mpirun
def test_eager_and_lazy_completion_give_identical_predictions(reference: np.ndarray,
                                                              tmp_path: Path) -> None:
    backends = ["mpi", "mpi-bls"] + (["bls"] if BLS else [])
    fifo = {}
    for mode in ("eager", "lazy"):
        pattern = str(tmp_path / f"{mode}_{{backend}}.npy")
        report = tmp_path / f"{mode}.json"
        run_adapter(COMMON + ["--backend", ",".join(backends), "--bound", "3", "--complete",
                              mode, "--delay-ms", "0:2", "--save-predictions", pattern,
                              "--json", str(report)], 3)
        for b in backends:
            assert np.load(pattern.format(backend=b)).tobytes() == reference.tobytes(), (mode, b)
        for run in _runs(report):
            s = run["summary"]
            assert s["complete"] == mode
            assert {"p50", "p95", "p99"} <= set(s["latency_ms"])
            assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
            fifo[mode, s["backend"]] = max(r["max_fifo"] for r in run["ranks"])
    # mpi completes inside start: eager finishes it at once, lazy holds bound + 1 batches
    assert fifo["eager", "mpi"] == 1
    assert fifo["lazy", "mpi"] == 4


@needs_mpirun
def test_latency_policy_changes_when_not_what(reference: np.ndarray, tmp_path: Path) -> None:
    """--patience-ms off, auto and fixed: the same bits, and the policy really waits."""
    backends = ["mpi-bls"] + (["bls"] if BLS else [])
    pattern, report = str(tmp_path / "{backend}_{run}.npy"), tmp_path / "p.json"
    # rank 1 is 3 ms slower per batch: the others would run ahead; a 20 ms patience
    # holds them back every step, auto at times
    run_adapter(COMMON + ["--backend", ",".join(backends), "--bound", "3",
                          "--patience-ms", "0,auto,20", "--slow-rank", "1", "--slow-ms", "3",
                          "--save-predictions", pattern, "--json", str(report)], 3)
    waits = {}
    for i, run in enumerate(_runs(report)):
        s = run["summary"]
        got = np.load(pattern.format(backend=s["backend"], run=i))
        assert got.tobytes() == reference.tobytes(), s["label"]
        waits[s["backend"], s["patience_ms"]] = (
            sum(r["patience_waits_s"] for r in run["ranks"]), max(r["max_fifo"] for r in run["ranks"]))
    for b in backends:
        assert waits[b, 0.0][0] == 0, waits  # off: no policy wait at all
        assert waits[b, 20.0][0] > 0, waits
        # held back, the fast ranks keep fewer exchanges in flight than when free
        assert waits[b, 20.0][1] < waits[b, 0.0][1], waits


# ------------------------------------------------------------------ input distribution

@needs_mpirun
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_input_dist_matches_replicated_bitwise(reference: np.ndarray, tmp_path: Path,
                                               ranks: int) -> None:
    pattern = str(tmp_path / "p_{backend}_{bound}.npy")
    r = run_adapter(COMMON + ["--backend", ",".join(ALL_BACKENDS), "--bound", "0,2",
                              "--input-dist", "--delay-ms", "0:1",
                              "--placement", "balanced-cost" if ranks == 3 else "contiguous",
                              "--save-predictions", pattern], ranks, timeout=240)
    assert "input-dist" in r.stdout
    for backend in ALL_BACKENDS:
        for bound in (0, 2):
            got = np.load(pattern.format(backend=backend, bound=bound))
            assert got.tobytes() == reference.tobytes(), (ranks, backend, bound)


@needs_mpirun
def test_bls_chains_the_input_messages(reference: np.ndarray, tmp_path: Path) -> None:
    """Chained, a step's lengths and indices reach each peer in one write, not two."""
    if not BLS:
        pytest.skip("blsfab does not import here")
    writes = {}
    for chain in ("16384", "0"):
        out, report = tmp_path / f"c{chain}.npy", tmp_path / f"c{chain}.json"
        run_adapter(COMMON + ["--backend", "bls", "--bound", "2", "--input-dist",
                              "--chain-bytes", chain, "--save-predictions", str(out),
                              "--json", str(report)], 2)
        assert np.load(out).tobytes() == reference.tobytes(), chain
        stats = [r["backend_stats"] for r in _runs(report)[0]["ranks"]]
        writes[chain] = sum(int(s["puts"]) + int(s["injects"]) for s in stats)
    # 2 ranks x (5 timed + 1 warm-up) steps: 3 writes per step to the peer unchained, 2 chained
    assert writes["16384"] < writes["0"], writes


# ------------------------------------------------------------------ LoadGen serving

def _serve(tmp: Path, scenario: str, extra: List[str], ranks: int = 2):
    preds, report = tmp / f"{scenario}.npz", tmp / f"{scenario}.json"
    r = run_adapter(COMMON + ["--scenario", scenario, "--duration-s", "1",
                              "--loadgen-dir", str(tmp / "logs"), "--save-predictions",
                              str(preds), "--json", str(report)] + extra, ranks, timeout=240)
    with np.load(preds) as z:
        ids, got = z["ids"], z["preds"]
    return r, ids, got, _runs(report)


def _check_served(r, ids, runs, scenario: str) -> None:
    s = runs[0]["summary"]
    assert s["issued"] == s["answered"] == len(ids) >= 200, s
    assert s["verdict"] in ("VALID", "INVALID") and s["achieved_qps"] > 0
    assert f"LoadGen verdict" in r.stdout and "achieved QPS" in r.stdout
    for path in s["logs"]:
        assert "Scenario : " + scenario.capitalize() in Path(path).read_text()


@needs_mpirun
@pytest.mark.skipif(not LOADGEN, reason="mlperf_loadgen does not import")
@pytest.mark.parametrize("scenario,backend", [("server", "bls"), ("offline", "mpi")])
def test_loadgen_responses_equal_closed_loop_bitwise(tmp_path: Path, scenario: str,
                                                     backend: str) -> None:
    """With one-row chunks every sample is computed alone, so its prediction cannot depend
    on which other queries shared its batch: responses equal the closed loop bit for bit."""
    if backend == "bls" and not BLS:
        backend = "mpi-bls"
    ref = _reference(tmp_path, ["--chunk", "1"])
    qps = ["--target-qps", "300"] if scenario == "server" else ["--target-qps", "250"]
    r, ids, got, runs = _serve(tmp_path, scenario, ["--chunk", "1", "--backend", backend,
                                                    "--bound", "2", "--delay-ms", "0:1"] + qps)
    _check_served(r, ids, runs, scenario)
    assert got.tobytes() == ref[ids].tobytes()


@needs_mpirun
@pytest.mark.skipif(not LOADGEN, reason="mlperf_loadgen does not import")
def test_loadgen_server_responses_close_with_shared_chunks(tmp_path: Path,
                                                           reference: np.ndarray) -> None:
    """With 8-row chunks a served sample sits at another row of another chunk than in the
    closed loop (its batch is whatever queries arrived together), and the GEMM kernels may
    round a row differently by its position: equal within 1e-6, not necessarily bitwise."""
    r, ids, got, runs = _serve(tmp_path, "server", ["--backend", "mpi", "--target-qps", "300"],
                               ranks=3)
    _check_served(r, ids, runs, "server")
    np.testing.assert_allclose(got, reference[ids], rtol=0, atol=1e-6)


# ------------------------------------------------------------------ bad options

def _one_error_line(args: List[str], needle: str, env_extra: Dict[str, str] = None) -> None:
    cmd = [sys.executable, "-m", "dlrm_adapter", *args]
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1],
                       env=adapter_env(env_extra), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_bad_serving_options_give_one_clear_line(tmp_path: Path) -> None:
    _one_error_line(["--scenario", "server", "--target-qps", "0"], "--target-qps must be > 0")
    _one_error_line(["--scenario", "server", "--target-qps", "-5"], "'-5'")
    _one_error_line(["--scenario", "offline", "--batch-size", "0"], "--batch-size must be >= 1")
    _one_error_line(["--target-qps", "100"], "--target-qps applies to --scenario")
    _one_error_line(["--no-follow-peers"], "--follow-peers applies to --scenario")
    _one_error_line(["--patience-ms", "soon"], "--patience-ms must be auto, 0 (off) or a "
                                               "number of milliseconds >= 0; got 'soon'")
    _one_error_line(["--patience-ms", "-1"], "got '-1'")
    _one_error_line(["--complete", "lazy", "--patience-ms", "2"], "needs --complete eager")
    # LoadGen missing: a module of that name that fails to import shadows the real one
    (tmp_path / "mlperf_loadgen.py").write_text("raise ImportError('not installed here')\n")
    env = adapter_env()
    _one_error_line(["--scenario", "server"], "pip install mlcommons-loadgen",
                    {"PYTHONPATH": f"{tmp_path}:{env['PYTHONPATH']}"})


# ------------------------------------------------------------------ input distribution, in process

class _Loopback:
    """Holds what every rank posted; ``finish_inputs`` hands rank ``me`` its blocks."""

    def __init__(self) -> None:
        self.posted: Dict[int, tuple] = {}
        self.me = 0

    def start_inputs(self, lengths, lcounts, indices, icounts, chain):
        self.posted[self.me] = (lengths.numpy(), list(lcounts), indices.numpy(), list(icounts))
        return self.me

    def finish_inputs(self, handle):
        import torch
        me, parts = self.me, ([], [], [], [])
        for src in sorted(self.posted):
            lflat, lc, iflat, ic = self.posted[src]
            for k, (flat, counts) in enumerate(((lflat, lc), (iflat, ic))):
                lo = sum(counts[:me])
                parts[2 * k].append(flat[lo:lo + counts[me]])
                parts[2 * k + 1].append(counts[me])
        return (torch.from_numpy(np.concatenate(parts[0])), parts[1],
                torch.from_numpy(np.concatenate(parts[2])), parts[3])


@pytest.mark.parametrize("ranks,batch", [(1, 37), (3, 37), (4, 37), (4, 2)])
def test_owners_rebuild_the_whole_batch_from_own_samples(ranks: int, batch: int) -> None:
    """Batch 2 over 4 ranks: two ranks hold no sample and still exchange."""
    from dlrm_adapter.config import CRITEO_KAGGLE, arch_for
    from dlrm_adapter.data import Pooling, SyntheticSource
    from dlrm_adapter.input_dist import InputDist, LocalInputs, bags_of_rows
    from dlrm_adapter.sharding import ExchangeLayout, batch_slices, place_tables

    arch = arch_for(CRITEO_KAGGLE, 300)
    src = SyntheticSource(arch, batch, 1, 3, Pooling.parse("1:3"), 1.1)
    tables = place_tables("balanced-rows", ranks, arch.table_sizes, src.mean_lookups())
    whole = src.local_batch(0, range(arch.num_tables), 0, batch)
    net = _Loopback()
    dists = [InputDist(ExchangeLayout(tuple(map(tuple, tables)), arch.emb_dim, r),
                       arch.num_tables, 0) for r in range(ranks)]
    slices = batch_slices(batch, ranks)
    for r, (lo, hi) in enumerate(slices):
        own = {t: bags_of_rows(i, o, lo, hi) for t, (i, o) in whole.sparse.items()}
        net.me = r
        dists[r].post(net, LocalInputs(whole.dense[lo:hi], own), flag=r % 2)
    for r in range(ranks):
        net.me = r
        got = dists[r].collect(net, r)
        assert got.rows_per_rank == [hi - lo for lo, hi in slices]
        assert got.flags == [s % 2 for s in range(ranks)]
        assert sorted(got.sparse) == sorted(tables[r])
        for t in tables[r]:
            idx, off = whole.sparse[t]
            assert np.array_equal(got.sparse[t][0], idx) and np.array_equal(got.sparse[t][1], off)
        # what a rank sent covers only its own samples
        lo, hi = slices[r]
        assert net.posted[r][0][0] == hi - lo
        own = sum(len(bags_of_rows(i, o, lo, hi)[1]) for i, o in whole.sparse.values())
        assert sum(net.posted[r][3]) == own


@pytest.mark.skipif(not BLS, reason="blsfab is not built")
@pytest.mark.parametrize("provider", ["shm", "tcp"])
def test_a_peer_post_is_seen_before_this_rank_posts(provider: str) -> None:
    """The server's --follow-peers: Communicator.heard() and BLS.peers_waiting() see a
    peer that posted a step this rank has not, and stop once this rank has posted."""
    from conftest import run_mpi

    out = run_mpi(3, "check_heard.py", provider, timeout=120)
    assert out.count(": ok") == 3, out
