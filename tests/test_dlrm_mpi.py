"""End-to-end DLRM adapter runs under real mpirun: predictions must match bit for bit.

Every run uses the same seed and data; the reference is a plain single process
(no mpirun).  1, 2, 3 and 4 ranks, bounds 0 and 4, random delays, every
backend (bls when blsfab imports), several placements.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlrm_adapter.config import ALI_CCP, arch_for  # noqa: E402
from dlrm_adapter.data import Pooling, SyntheticSource  # noqa: E402
from dlrm_support import COMMON, adapter_env as _env, needs_mpirun  # noqa: E402
from dlrm_support import run_adapter  # noqa: E402


def _bls_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import blsfab"], env=_env(), capture_output=True)
    return r.returncode == 0


BLS = _bls_available()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Predictions of one plain process, no mpirun."""
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    run_adapter(COMMON + ["--backend", "mpi", "--bound", "0", "--save-predictions", str(out)],
                None)
    preds = np.load(out)
    assert preds.shape == (45 * 5,) and preds.dtype == np.float32
    assert len(np.unique(preds)) > 0.9 * len(preds), "predictions are degenerate"
    return preds


@needs_mpirun
@pytest.mark.parametrize("ranks,placement", [(1, "contiguous"), (2, "contiguous"),
                                             (3, "balanced-rows"), (4, "balanced-cost")])
def test_predictions_bitwise_across_ranks_backends_bounds(
        reference: np.ndarray, tmp_path: Path, ranks: int, placement: str) -> None:
    backends = ["mpi", "mpi-bls"] + (["bls"] if BLS else [])
    pattern = str(tmp_path / "p_{backend}_{bound}.npy")
    report = tmp_path / "run.json"
    r = run_adapter(COMMON + ["--backend", ",".join(backends), "--bound", "0,4",
                              "--delay-ms", "0:2", "--placement", placement,
                              "--save-predictions", pattern, "--json", str(report)], ranks)
    assert "predictions identical across runs: yes" in r.stdout
    for backend in backends:
        for bound in (0, 4):
            got = np.load(pattern.format(backend=backend, bound=bound))
            assert got.tobytes() == reference.tobytes(), (ranks, backend, bound)
    runs = json.loads(report.read_text())["runs"]
    assert len(runs) == 2 * len(backends)
    for run in runs:
        s = run["summary"]
        assert s["ranks"] == ranks and s["batches"] == 5 and s["slept_ms_per_batch"] > 0
        assert len(run["ranks"]) == ranks
        if s["backend"] == "mpi-bls":  # eager completion may keep the FIFO shorter
            assert 1 <= s["max_lag"] <= min(s["bound"] + 1, 5)
        if s["backend"] == "mpi":
            assert s["max_lag"] == 0


@needs_mpirun
def test_bls_straggler_progress_thread(reference: np.ndarray, tmp_path: Path) -> None:
    """bls with a persistent straggler, blsfab's progress thread and test-and-sleep waits."""
    if not BLS:
        pytest.skip("blsfab does not import here: the bls backend is not covered")
    out = tmp_path / "bls.npy"
    r = run_adapter(COMMON + ["--backend", "bls", "--bound", "2", "--slow-rank", "1",
                              "--slow-ms", "2", "--bls-progress", "thread", "--poll-us", "50",
                              "--save-predictions", str(out)], 2)
    assert "blsfab max_lead" in r.stdout
    assert np.load(out).tobytes() == reference.tobytes()


# ------------------------------------------------------------------ Criteo TSV input

def _write_criteo(path: Path, n: int) -> None:
    g = np.random.default_rng(4)
    with open(path, "w") as fh:
        for i in range(n):
            dense = [str(int(v)) if v >= 0 else "" for v in g.integers(-3, 1000, size=13)]
            cats = [f"{int(v):08x}" if v % 7 else "" for v in g.integers(0, 2**32, size=26)]
            fh.write("\t".join([str(int(g.integers(0, 2)))] + dense + cats) + "\n")


@needs_mpirun
def test_criteo_tsv_run_matches_across_ranks(tmp_path: Path) -> None:
    data = tmp_path / "train.txt"
    _write_criteo(data, 70)  # 3 batches of 32: the last one has 6 samples
    args = ["--data", str(data), "--rows-cap", "200", "--batch-size", "32", "--chunk", "8",
            "--warmup", "0", "--no-progress", "--backend", "mpi-bls", "--bound", "2"]
    single, multi = tmp_path / "one.npy", tmp_path / "three.npy"
    r1 = run_adapter(args + ["--save-predictions", str(single)], None)
    run_adapter(args + ["--save-predictions", str(multi)], 3)
    a, b = np.load(single), np.load(multi)
    assert a.shape == (70,) and a.tobytes() == b.tobytes()
    assert "logloss / accuracy" in r1.stdout


# ------------------------------------------------------------------ checkpoints

class _ReferenceStyleDLRM(nn.Module):
    """Written here independently: DLRM_Net's parameter layout and forward pass."""

    def __init__(self, sizes: List[int], dim: int, bot: List[int], top: List[int]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.emb_l = nn.ModuleList()
        for n in sizes:
            e = nn.EmbeddingBag(n, dim, mode="sum")
            with torch.no_grad():
                e.weight.uniform_(-0.3, 0.3, generator=g)
            self.emb_l.append(e)
        self.bot_l = self._mlp(bot, sigmoid_last=False)
        self.top_l = self._mlp(top, sigmoid_last=True)

    @staticmethod
    def _mlp(dims: List[int], sigmoid_last: bool) -> nn.Sequential:
        layers: List[nn.Module] = []
        for i in range(len(dims) - 1):
            layers += [nn.Linear(dims[i], dims[i + 1])]
            layers += [nn.Sigmoid() if sigmoid_last and i == len(dims) - 2 else nn.ReLU()]
        return nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, bags: List) -> torch.Tensor:
        x = self.bot_l(dense)
        ly = [self.emb_l[t](torch.from_numpy(i), torch.from_numpy(o))
              for t, (i, o) in enumerate(bags)]
        t = torch.cat([x] + ly, dim=1).view(x.shape[0], -1, x.shape[1])
        z = torch.bmm(t, t.transpose(1, 2))
        li, lj = torch.tril_indices(t.shape[1], t.shape[1], offset=-1)
        return self.top_l(torch.cat([x, z[:, li, lj]], dim=1)).view(-1)


@needs_mpirun
def test_reference_checkpoint_loads_and_predicts(tmp_path: Path) -> None:
    sizes = [min(n, 40) for n in ALI_CCP.table_sizes]
    dim, f = 4, len(sizes) + 1
    net = _ReferenceStyleDLRM(sizes, dim, [ALI_CCP.dense_dim, 16, dim],
                              [dim + f * (f - 1) // 2, 8, 1])
    ckpt = tmp_path / "model.pt"
    torch.save({"epoch": 3, "iter": 10, "state_dict": net.state_dict()}, ckpt)
    args = ["--dataset", "ali-ccp", "--load-model", str(ckpt), "--batch-size", "30",
            "--num-batches", "2", "--pooling", "1:3", "--chunk", "8", "--seed", "2",
            "--warmup", "0", "--no-progress", "--backend", "mpi", "--bound", "1"]
    single, multi = tmp_path / "one.npy", tmp_path / "two.npy"
    run_adapter(args + ["--save-predictions", str(single)], None)
    run_adapter(args + ["--save-predictions", str(multi), "--backend", "mpi-bls"], 2)
    got = np.load(single)
    assert got.tobytes() == np.load(multi).tobytes()

    arch = arch_for(ALI_CCP)  # only the field counts matter for the data stream
    arch = type(arch)(tuple(sizes), dim, (ALI_CCP.dense_dim, 16, dim), (dim + 171, 8, 1))
    src = SyntheticSource(arch, 30, 2, seed=2, pooling=Pooling(1, 3))
    want = []
    with torch.inference_mode():
        for b in range(2):
            lb = src.local_batch(b, range(len(sizes)), 0, 30)
            want.append(net(torch.from_numpy(lb.dense), [lb.sparse[t] for t in range(len(sizes))]))
    want_np = torch.cat(want).numpy()
    assert np.std(want_np) > 1e-3
    np.testing.assert_allclose(got, want_np, rtol=1e-5, atol=1e-6)


def test_checkpoint_shape_mismatch_is_reported(tmp_path: Path) -> None:
    net = _ReferenceStyleDLRM([5] * 3, 4, [13, 4], [4 + 6, 1])
    ckpt = tmp_path / "small.pt"
    torch.save(net.state_dict(), ckpt)
    r = run_adapter(["--load-model", str(ckpt), "--no-progress"], None, check=False)
    assert r.returncode == 2
    assert "3 tables" in r.stderr and "criteo-kaggle has 26" in r.stderr


def test_bad_option_values_are_named() -> None:
    r = run_adapter(["--pooling", "5:2", "--num-batches", "1"], None, check=False)
    assert r.returncode == 2 and "'5:2'" in r.stderr
    r = run_adapter(["--backend", "mpi,nccl"], None, check=False)
    assert r.returncode == 2 and "'nccl'" in r.stderr
    r = run_adapter(["--bound", "0,4", "--save-predictions", "p.npy"], None, check=False)
    assert r.returncode == 2 and "{backend}" in r.stderr
