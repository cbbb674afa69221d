"""The DLRM adapter's torch.distributed backends (torch-bls, gloo) and --launcher torch.

* under mpirun (2 and 4 ranks), torch-bls and gloo with bounds 0 and 4 save the
  same predictions, bit for bit, as the mpi backend of the same job and as a
  plain single process;
* without MPI, plain processes with torchrun's variables (RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT) run torch-bls, gloo and bls (store bootstrap, tcp)
  and match too; so does torchrun itself, with the launcher auto-detected;
* mpi backends under --launcher torch, and a torch launcher without its
  variables, fail with an error naming the launcher.

About 30-40 s on 2 cores.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlrm_adapter.launch import (LaunchError, check_backends, resolve_launcher,  # noqa: E402
                                 torch_env)
from dlrm_adapter.report import format_comparison  # noqa: E402
from dlrm_support import COMMON, ROOT, needs_mpirun  # noqa: E402
from dlrm_support import adapter_env as _env, fail_text as _fail_text  # noqa: E402
from dlrm_support import run_adapter  # noqa: E402

TORCHRUN = shutil.which("torchrun")


def _imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], env=_env(),
                          capture_output=True).returncode == 0


BLSFAB_TORCH = _imports("blsfab.torch")
needs_blsfab = pytest.mark.skipif(not BLSFAB_TORCH, reason="blsfab.torch does not import")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mpi(args: List[str], np_: Optional[int], timeout: float = 120.0,
            check: bool = True) -> subprocess.CompletedProcess:
    return run_adapter(args, np_, timeout, check)


def run_torch_ranks(args: List[str], size: int, timeout: float = 120.0) -> List[str]:
    """``size`` plain processes with torchrun's variables (no torchrun, no MPI)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "dlrm_adapter", "--launcher", "torch", *args]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True,
                              env=_env({"RANK": str(r), "WORLD_SIZE": str(size),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
             for r in range(size)]
    outs: List[str] = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outs += [p.communicate()[0] for p in procs[len(outs):]]
        pytest.fail("hung\n" + _fail_text(cmd, outs))
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(_fail_text(cmd, outs))
    return outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Predictions of one plain process with the mpi backend (no mpirun)."""
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    run_mpi(COMMON + ["--backend", "mpi", "--bound", "0", "--save-predictions", str(out)], None)
    preds = np.load(out)
    assert preds.shape == (45 * 5,) and preds.dtype == np.float32
    assert len(np.unique(preds)) > 0.9 * len(preds), "predictions are degenerate"
    return preds


# ------------------------------------------------------------------ under mpirun

@needs_mpirun
@pytest.mark.parametrize("ranks", [2, 4])
def test_torch_backends_match_mpi_bitwise(reference: np.ndarray, tmp_path: Path,
                                          ranks: int) -> None:
    backends = ["mpi", "gloo"] + (["torch-bls"] if BLSFAB_TORCH else [])
    pattern = str(tmp_path / "p_{backend}_{bound}.npy")
    report = tmp_path / "run.json"
    r = run_mpi(COMMON + ["--backend", ",".join(backends), "--bound", "0,4",
                          "--delay-ms", "0:2", "--save-predictions", pattern,
                          "--json", str(report)], ranks)
    assert "predictions identical across runs: yes" in r.stdout
    for bound in (0, 4):
        mpi = np.load(pattern.format(backend="mpi", bound=bound))
        assert mpi.tobytes() == reference.tobytes()
        for backend in backends[1:]:
            got = np.load(pattern.format(backend=backend, bound=bound))
            assert got.tobytes() == mpi.tobytes(), (ranks, backend, bound)
    doc = json.loads(report.read_text())
    assert doc["config"]["launcher"] == "mpi"
    for run in doc["runs"]:
        s = run["summary"]
        assert s["ranks"] == ranks and s["batches"] == 5
        if s["backend"] == "torch-bls":
            assert s["lag_source"] == "blsfab max_lead" and 0 <= s["max_lag"] <= s["bound"]
        if s["backend"] == "gloo":  # eager completion may keep the FIFO shorter
            assert 1 <= s["max_lag"] <= min(s["bound"] + 1, 5)
    if not BLSFAB_TORCH:
        pytest.skip("blsfab.torch does not import: torch-bls was not covered")


# ------------------------------------------------------------------ without MPI

@needs_blsfab
def test_torch_launcher_store_bootstrap_tcp(reference: np.ndarray, tmp_path: Path) -> None:
    """Three hand-started ranks: torch-bls, gloo and bls (store bootstrap) over tcp."""
    pattern = str(tmp_path / "q_{backend}_{bound}.npy")
    report = tmp_path / "run.json"
    outs = run_torch_ranks(COMMON + ["--backend", "torch-bls,gloo,bls", "--bound", "0,4",
                                     "--provider", "tcp", "--delay-ms", "0:2",
                                     "--save-predictions", pattern, "--json", str(report)], 3)
    assert "(launcher torch)" in outs[0]
    assert "predictions identical across runs: yes" in outs[0]
    assert "vs gloo" in outs[0]  # no mpi run: gloo is the comparison's baseline
    for backend in ("torch-bls", "gloo", "bls"):
        for bound in (0, 4):
            got = np.load(pattern.format(backend=backend, bound=bound))
            assert got.tobytes() == reference.tobytes(), (backend, bound)
    doc = json.loads(report.read_text())
    assert doc["config"]["launcher"] == "torch" and doc["config"]["world_size"] == 3
    for run in doc["runs"]:
        if run["summary"]["backend"] in ("torch-bls", "bls"):
            assert {r["backend_stats"]["provider"] for r in run["ranks"]} == {"tcp;ofi_rxm"}
            assert run["summary"]["max_lag"] <= run["summary"]["bound"]


@needs_blsfab
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_torchrun_auto_launcher(reference: np.ndarray, tmp_path: Path) -> None:
    """torchrun sets RANK/WORLD_SIZE: --launcher auto picks torch; blsfab progress
    thread and test-and-sleep waits on the torch backends."""
    pattern = str(tmp_path / "t_{backend}.npy")
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "dlrm_adapter", *COMMON,
           "--backend", "torch-bls,gloo", "--bound", "2", "--bls-progress", "thread",
           "--poll-us", "50", "--save-predictions", pattern]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} hung\n{exc.stdout}\n{exc.stderr}")
    assert r.returncode == 0, _fail_text(cmd, [r.stdout + r.stderr])
    assert "(launcher torch)" in r.stdout
    for backend in ("torch-bls", "gloo"):
        assert np.load(pattern.format(backend=backend)).tobytes() == reference.tobytes()


# ------------------------------------------------------------------ errors

def test_mpi_backends_refused_under_torch_launcher() -> None:
    r = subprocess.run([sys.executable, "-m", "dlrm_adapter", "--backend", "gloo,mpi-bls"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": "1"}))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--backend mpi-bls needs MPI" in r.stderr and "--launcher torch" in r.stderr
    assert "auto" in r.stderr  # says why the torch launcher was chosen


def test_torch_launcher_names_missing_variables() -> None:
    r = subprocess.run([sys.executable, "-m", "dlrm_adapter", "--launcher", "torch"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=_env({"RANK": "0", "WORLD_SIZE": "1"}))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--launcher torch needs" in r.stderr
    assert "missing: MASTER_ADDR, MASTER_PORT" in r.stderr


def test_launcher_resolution_and_backend_checks() -> None:
    assert resolve_launcher("auto", {}) == "mpi"
    assert resolve_launcher("auto", {"RANK": "1", "WORLD_SIZE": "2"}) == "torch"
    assert resolve_launcher("auto", {"RANK": "1", "WORLD_SIZE": "2",
                                     "OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert resolve_launcher("torch", {}) == "torch"
    with pytest.raises(LaunchError, match="--launcher"):
        resolve_launcher("slurm", {})
    check_backends("mpi", ["mpi", "mpi-bls", "bls", "torch-bls", "gloo"])
    check_backends("torch", ["bls", "torch-bls", "gloo"])
    with pytest.raises(LaunchError, match=r"--backend mpi needs MPI.*--launcher torch"):
        check_backends("torch", ["gloo", "mpi"])
    with pytest.raises(LaunchError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        torch_env({})
    with pytest.raises(LaunchError, match="inconsistent"):
        torch_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_comparison_baseline_falls_back_to_gloo() -> None:
    def summary(backend: str, ms: float) -> dict:
        pct = {"mean": ms, "median": ms, "p95": ms, "p99": ms}
        return {"label": backend, "backend": backend, "bound": 4, "delay_ms": None,
                "per_batch_ms": ms, "batch_time_ms": pct, "throughput_sps": 1.0,
                "blocked_ms_per_batch": {"mean": 0.0}, "max_lag": 0, "batches": 5,
                "predictions_sha256": "ab" * 8}
    text = format_comparison([summary("gloo", 4.0), summary("torch-bls", 2.0)])
    assert "vs gloo" in text and "0.50x" in text
    text = format_comparison([summary("mpi", 8.0), summary("gloo", 4.0)])
    assert "vs mpi" in text and "0.50x" in text
