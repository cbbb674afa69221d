"""What the DLRM end-to-end tests share: the repo paths, the small problem they
all run, a clean environment, and one way to launch the adapter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")

# Small but not trivial: odd batch (uneven slices), chunks smaller than slices,
# random pooling and Zipf indices.
COMMON = ["--rows-cap", "500", "--batch-size", "45", "--chunk", "8", "--num-batches", "5",
          "--warmup", "1", "--pooling", "1:4", "--zipf", "1.05", "--seed", "7",
          "--no-progress"]

# Variables of an enclosing launcher, which must not leak into the jobs we start.
LAUNCHER_VARS = ("OMPI_", "PMIX_", "PMI_", "SLURM_", "TORCHELASTIC_", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def adapter_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARS)}
    env.pop("FI_PROVIDER", None)
    paths = [str(ROOT), str(ROOT / "src")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(paths), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
               FI_TCP_IFACE="lo", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               TORCH_CPP_LOG_LEVEL="ERROR", IPATH_NO_BACKTRACE="1")
    env.update(extra or {})
    return env


def fail_text(cmd: List[str], outs: List[str]) -> str:
    ranks = (f"--- rank {r}\n{o[-4000:]}" for r, o in enumerate(outs))
    return f"{' '.join(cmd)}\n" + "\n".join(ranks)


def run_adapter(args: List[str], np_: Optional[int], timeout: float = 150.0,
                check: bool = True) -> subprocess.CompletedProcess:
    """``mpirun -np np_ python -m dlrm_adapter args`` (a plain process when np_ is None)."""
    cmd = [sys.executable, "-m", "dlrm_adapter", *args]
    if np_ is not None:
        cmd = [MPIRUN or "mpirun", "--oversubscribe", "--mca", "btl", "vader,self",
               "-np", str(np_), *cmd]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=adapter_env(), capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} hung for {timeout:g} s\n{exc.stdout}\n{exc.stderr}")
    if check and r.returncode != 0:
        raise AssertionError(fail_text(cmd, [r.stdout + r.stderr]))
    return r
