"""Coming from facebookresearch/dlrm: its checkpoints, weighted pooling, processed
Criteo files and command line.

The reference itself is not installed; the checkpoints and data files here are
written in its formats by code in this file (its parameter names, save dict and
.npz layout), and its math is recomputed independently with numpy.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dlrm_adapter.cli import parse_args  # noqa: E402
from dlrm_adapter.config import arch_from_dims  # noqa: E402
from dlrm_adapter.data import ProcessedSource, read_npz_rows  # noqa: E402
from dlrm_adapter.model import DLRM, arch_from_state_dict, load_checkpoint  # noqa: E402
from dlrm_support import needs_mpirun, run_adapter  # noqa: E402

torch.set_num_threads(1)

DENSE = 13
SIZES = [7, 5, 11, 3, 9, 4, 6, 8, 2, 10, 5, 7, 3, 6, 4, 9, 5, 3, 8, 6, 2, 7, 4, 5, 3, 6]
DIM = 4


# ------------------------------------------------------------------ the reference, by hand

def _mlp(dims: List[int], sigmoid_last: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        layers.append(nn.Sigmoid() if sigmoid_last and i == len(dims) - 2 else nn.ReLU())
    return nn.Sequential(*layers)


def reference_state(sizes: List[int], dim: int, bot: List[int], top_hidden: List[int],
                    learned: bool = False, seed: int = 5) -> Dict[str, torch.Tensor]:
    """A DLRM_Net state_dict: emb_l.{t}.weight, bot_l/top_l Sequential, v_W_l.{t}."""
    g = torch.Generator().manual_seed(seed)
    f = len(sizes) + 1
    sd: Dict[str, torch.Tensor] = {}
    for t, n in enumerate(sizes):
        sd[f"emb_l.{t}.weight"] = torch.rand(n, dim, generator=g) * 0.6 - 0.3
    torch.manual_seed(seed)
    sd.update({f"bot_l.{k}": v for k, v in _mlp(bot, False).state_dict().items()})
    top = [dim + f * (f - 1) // 2, *top_hidden]
    sd.update({f"top_l.{k}": v for k, v in _mlp(top, True).state_dict().items()})
    if learned:  # far from 1, so ignoring them would show
        for t, n in enumerate(sizes):
            sd[f"v_W_l.{t}"] = torch.rand(n, generator=g) * 2.5 - 0.5
    return sd


def save_like_reference(sd: Dict[str, torch.Tensor], path: Path) -> None:
    """The dict dlrm_s_pytorch.py's --save-model writes, numpy scalars included."""
    params = [nn.Parameter(v.clone()) for v in sd.values()]
    opt = torch.optim.SGD(params, lr=0.1)
    torch.save({"nepochs": 1, "nbatches": 100, "nbatches_test": 10, "state_dict": sd,
                "test_acc": np.float64(0.78125), "epoch": 0, "iter": 100,
                "train_loss": np.float32(0.4567), "total_loss": np.float32(45.67),
                "opt_state_dict": opt.state_dict()}, path)


def reference_forward(sd: Dict[str, torch.Tensor], dense: np.ndarray,
                      bags: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """DLRM_Net.forward recomputed in float64 numpy: weighted bag sums, dot interaction."""
    def mlp(prefix: str, x: np.ndarray, sigmoid_last: bool) -> np.ndarray:
        i = 0
        while f"{prefix}.{i}.weight" in sd:
            w = sd[f"{prefix}.{i}.weight"].double().numpy()
            x = x @ w.T + sd[f"{prefix}.{i}.bias"].double().numpy()
            last = f"{prefix}.{i + 2}.weight" not in sd
            x = 1 / (1 + np.exp(-x)) if (last and sigmoid_last) else np.maximum(x, 0)
            i += 2
        return x

    x = mlp("bot_l", dense.astype(np.float64), False)
    feats = [x]
    for t, (idx, off) in enumerate(bags):
        table = sd[f"emb_l.{t}.weight"].double().numpy()
        w = (sd[f"v_W_l.{t}"].double().numpy()[idx] if f"v_W_l.{t}" in sd
             else np.ones(len(idx)))
        ends = list(off[1:]) + [len(idx)]
        feats.append(np.stack([(w[a:e, None] * table[idx[a:e]]).sum(0)
                               for a, e in zip(off, ends)]))
    t_ = np.stack(feats, axis=1)
    z = t_ @ t_.transpose(0, 2, 1)
    li, lj = np.tril_indices(t_.shape[1], -1)
    return mlp("top_l", np.concatenate([x, z[:, li, lj]], axis=1), True)[:, 0]


# ------------------------------------------------------------------ checkpoints

def test_reference_save_format_loads_without_flags(tmp_path: Path) -> None:
    sd = reference_state([5, 7, 3], DIM, [DENSE, 8, DIM], [6, 1])
    path = tmp_path / "m.pt"
    save_like_reference(sd, path)
    state = load_checkpoint(str(path))
    assert sorted(state) == sorted(sd)
    assert all(torch.equal(state[k], sd[k]) for k in sd)
    assert arch_from_state_dict(state).table_sizes == (5, 7, 3)


def test_numpy1_spelling_of_the_save_format_loads(tmp_path: Path) -> None:
    """Files saved under numpy 1 name numpy.core.multiarray.scalar instead."""
    sd = reference_state([5, 7, 3], DIM, [DENSE, 8, DIM], [6, 1])
    new, old = tmp_path / "new.pt", tmp_path / "old.pt"
    save_like_reference(sd, new)
    with zipfile.ZipFile(new) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    state = load_checkpoint(str(old))
    assert torch.equal(state["emb_l.1.weight"], sd["emb_l.1.weight"])


def test_other_globals_still_need_trust(tmp_path: Path) -> None:
    path = tmp_path / "arr.pt"
    torch.save({"state_dict": {}, "counts": np.arange(3)}, path)  # a numpy array
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_checkpoint(str(path))


def _weighted_model(sizes: List[int], learned_sd: Dict[str, torch.Tensor]) -> DLRM:
    arch = arch_from_state_dict(learned_sd)
    assert arch.weighted_pooling == "learned"
    return DLRM.from_state_dict(arch, range(len(sizes)), learned_sd, chunk=8)


def test_learned_weighted_pooling_matches_independent_sums() -> None:
    sizes = [7, 5, 11]
    sd = reference_state(sizes, DIM, [DENSE, 8, DIM], [6, 1], learned=True)
    model = _weighted_model(sizes, sd)
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 5, size=12)
    off = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    bags = {t: (rng.integers(0, n, size=int(lengths.sum())).astype(np.int64), off)
            for t, n in enumerate(sizes)}
    got = model.apply_emb(bags, 12).numpy()
    for t, (idx, o) in bags.items():
        table, w = sd[f"emb_l.{t}.weight"].double().numpy(), sd[f"v_W_l.{t}"].double().numpy()
        for b in range(12):
            rows = idx[o[b]:o[b] + lengths[b]]
            want = (w[rows, None] * table[rows]).sum(0)
            np.testing.assert_allclose(got[b, t], want, rtol=0, atol=1e-6)
    # and the whole forward, against the float64 recomputation
    dense = rng.random((12, DENSE), dtype=np.float32)
    x = model.bottom_rows(torch.from_numpy(dense), 0)
    pred = model.top_rows(x, torch.from_numpy(got), 0).numpy()
    want = reference_forward(sd, dense, [bags[t] for t in range(3)])
    np.testing.assert_allclose(pred, want, rtol=0, atol=1e-6)
    unweighted = reference_forward({k: v for k, v in sd.items() if not k.startswith("v_W_l")},
                                   dense, [bags[t] for t in range(3)])
    assert np.abs(unweighted - want).max() > 1e-3  # the weights matter here


def test_fixed_weighted_pooling_is_ones() -> None:
    sizes = [7, 5, 11]
    sd = reference_state(sizes, DIM, [DENSE, 8, DIM], [6, 1])
    plain = DLRM.from_state_dict(arch_from_state_dict(sd), range(3), sd)
    arch = arch_from_dims(sizes, DIM, [DENSE, 8, DIM], [6, 1], weighted_pooling="fixed")
    fixed = DLRM.from_state_dict(arch, range(3), sd)
    assert fixed.v_W_l and all(torch.equal(v, torch.ones(n)) for v, n in
                               zip(fixed.v_W_l.values(), sizes))
    bags = {t: (np.arange(6, dtype=np.int64) % n, np.array([0, 2, 3], dtype=np.int64))
            for t, n in enumerate(sizes)}
    np.testing.assert_allclose(fixed.apply_emb(bags, 3), plain.apply_emb(bags, 3), atol=1e-7)


# ------------------------------------------------------------------ refusals

def _base() -> Dict[str, torch.Tensor]:
    return reference_state([5, 7, 3], DIM, [DENSE, 8, DIM], [6, 1])


def test_qr_embeddings_are_named_and_refused() -> None:
    sd = _base()
    w = sd.pop("emb_l.1.weight")
    sd["emb_l.1.weight_q"], sd["emb_l.1.weight_r"] = w[:2], w[:4]
    with pytest.raises(ValueError, match=r"quotient-remainder \(QR\) embeddings.*table\(s\) \[1\]"
                                         r".*not supported.*without --qr-flag"):
        arch_from_state_dict(sd)


def test_md_embeddings_are_named_and_refused() -> None:
    sd = _base()
    w = sd.pop("emb_l.2.weight")
    sd["emb_l.2.embs.weight"], sd["emb_l.2.proj.weight"] = w[:, :2], torch.zeros(DIM, 2)
    with pytest.raises(ValueError, match=r"mixed-dimension \(MD\) embeddings.*table\(s\) \[2\]"
                                         r".*without --md-flag"):
        arch_from_state_dict(sd)


def test_per_rank_shard_is_named_and_refused() -> None:
    """Rank 1 of 2 of a reference mpirun run: its own tables, DDP-wrapped MLPs."""
    sd = _base()
    shard = {"emb_l.0.weight": sd["emb_l.2.weight"]}
    shard.update({k.replace("bot_l.", "bot_l.module.").replace("top_l.", "top_l.module."): v
                  for k, v in sd.items() if k.startswith(("bot_l.", "top_l."))})
    with pytest.raises(ValueError, match=r"one rank's shard of a multi-rank reference run.*"
                                         r"holding 1 embedding table.*merge the shards"):
        arch_from_state_dict(shard)


def test_entries_that_change_the_math_are_refused_not_ignored() -> None:
    sd = _base()
    sd["emb_l.0.bias"] = torch.zeros(DIM)
    with pytest.raises(ValueError, match=r"emb_l\.0\.bias are not part of.*refused"):
        arch_from_state_dict(sd)
    sd = reference_state([5, 7, 3], DIM, [DENSE, 8, DIM], [6, 1], learned=True)
    del sd["v_W_l.1"]
    with pytest.raises(ValueError, match=r"v_W_l\.\* for tables \[0, 2\] but not for \[1\]"):
        arch_from_state_dict(sd)


# ------------------------------------------------------------------ processed data

def write_processed(path: Path, n: int, sizes: List[int], fortran: bool = False,
                    seed: int = 1) -> Dict[str, np.ndarray]:
    """The reference's processed layout: X_int int32 (N, 13), X_cat float64 (N, 26)
    (numbered categories), y int32, counts int32; per-day files are Fortran-ordered."""
    rng = np.random.default_rng(seed)
    x_int = rng.integers(-2, 3000, size=(n, DENSE)).astype(np.int32)
    x_cat = np.stack([rng.integers(0, s, size=n) for s in sizes], axis=1).astype(np.float64)
    if fortran:
        x_cat, x_int = np.asfortranarray(x_cat), np.asfortranarray(x_int)
    arrays = {"X_int": x_int, "X_cat": x_cat, "y": rng.integers(0, 2, size=n).astype(np.int32),
              "counts": np.array(sizes, dtype=np.int32)}
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.mark.parametrize("fortran", [False, True])
def test_npz_rows_stream_only_what_is_asked(tmp_path: Path, fortran: bool) -> None:
    arrays = write_processed(tmp_path / "p.npz", 50, SIZES, fortran)
    got, n = read_npz_rows(str(tmp_path / "p.npz"), "X_cat", 17)
    assert n == 50 and got.shape == (17, 26)
    assert np.array_equal(got, arrays["X_cat"][:17])


def test_processed_batch_is_the_reference_transform(tmp_path: Path) -> None:
    arrays = write_processed(tmp_path / "p.npz", 40, SIZES)
    arch = arch_from_dims(SIZES, DIM, [DENSE, 8, DIM], [6, 1])
    src = ProcessedSource(str(tmp_path / "p.npz"), arch, batch_size=16, num_batches=None)
    assert src.num_batches == 3 and src.size_of(2) == 8
    lb = src.local_batch(1, range(26), 4, 10)
    # the reference: negatives set to 0 by its preprocessing, then torch.log(x + 1) in float32
    x = np.where(arrays["X_int"] < 0, 0, arrays["X_int"])
    want = torch.log(torch.tensor(x[20:26], dtype=torch.float) + 1).numpy()
    assert lb.dense.tobytes() == want.tobytes()
    assert np.array_equal(lb.sparse[5][0], arrays["X_cat"][16:32, 5].astype(np.int64))
    assert np.array_equal(lb.sparse[5][1], np.arange(16))
    assert np.array_equal(lb.labels, arrays["y"][16:32].astype(np.float32))


def test_processed_max_ind_range_and_out_of_range(tmp_path: Path) -> None:
    arrays = write_processed(tmp_path / "p.npz", 30, SIZES)
    small = arch_from_dims([3] * 26, DIM, [DENSE, 8, DIM], [6, 1])
    with pytest.raises(ValueError, match=r"table 0 is looked up at row \d+ but has 3 rows; if "
                                         r"the model was trained with --max-ind-range 3"):
        ProcessedSource(str(tmp_path / "p.npz"), small, 8, None)
    src = ProcessedSource(str(tmp_path / "p.npz"), small, 8, None, max_ind_range=3)
    assert np.array_equal(src.rows_all, arrays["X_cat"].astype(np.int64) % 3)


def test_processed_data_end_to_end_one_batch(tmp_path: Path) -> None:
    """Our flags and the reference's, one process: the predictions of the first batch
    equal DLRM_Net's forward on the same file recomputed by hand."""
    arrays = write_processed(tmp_path / "kaggle_processed.npz", 24, SIZES)
    sd = reference_state(SIZES, DIM, [DENSE, 8, DIM], [6, 1], learned=True)
    save_like_reference(sd, tmp_path / "m.pt")
    common = ["--load-model", str(tmp_path / "m.pt"), "--no-progress", "--warmup", "0",
              "--chunk", "8"]
    ours, theirs = tmp_path / "ours.npy", tmp_path / "theirs.npy"
    run_adapter(common + ["--processed-data", str(tmp_path / "kaggle_processed.npz"),
                          "--batch-size", "24", "--num-batches", "1",
                          "--save-predictions", str(ours)], None)
    run_adapter(common + ["--data-generation", "dataset", "--data-set", "kaggle",
                          "--processed-data-file", str(tmp_path / "kaggle_processed.npz"),
                          "--mini-batch-size", "24", "--num-batches", "0", "--inference-only",
                          "--arch-mlp-bot", "13-8-4", "--arch-sparse-feature-size", "4",
                          "--save-predictions", str(theirs)], None)
    got = np.load(ours)
    assert got.shape == (24,) and got.tobytes() == np.load(theirs).tobytes()
    x = np.where(arrays["X_int"] < 0, 0, arrays["X_int"])
    dense = torch.log(torch.tensor(x, dtype=torch.float) + 1).numpy()
    bags = [(arrays["X_cat"][:, t].astype(np.int64), np.arange(24)) for t in range(26)]
    np.testing.assert_allclose(got, reference_forward(sd, dense, bags), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the command line

def _refused(argv: List[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    return err


def test_training_flag_is_rejected_in_one_line(capsys: pytest.CaptureFixture) -> None:
    err = _refused(["--learning-rate", "0.1"], capsys)
    assert err == ("dlrm_adapter: error: --learning-rate: a training flag of "
                   "facebookresearch/dlrm; dlrm_adapter is inference only (drop it)\n")
    assert "inference only" in _refused(["--nepochs", "3"], capsys)
    assert "not supported by dlrm_adapter" in _refused(["--qr-flag"], capsys)


def test_aliases_map_and_must_agree(capsys: pytest.CaptureFixture) -> None:
    args = parse_args(["--mini-batch-size", "64", "--numpy-rand-seed", "727",
                       "--dist-backend", "mpi", "--num-indices-per-lookup", "3",
                       "--num-indices-per-lookup-fixed", "1", "--launcher", "mpi"])
    assert (args.batch_size, args.seed, args.backend, args.pooling) == (64, 727, "mpi", "3")
    assert parse_args(["--num-indices-per-lookup", "3", "--launcher", "mpi"]).pooling == "1:3"
    assert "disagree" in _refused(["--mini-batch-size", "64", "--batch-size", "32"], capsys)
    assert "'nccl'" in _refused(["--dist-backend", "nccl"], capsys)
    assert "read as True" in _refused(["--num-indices-per-lookup-fixed", "0"], capsys)
    assert "preprocessing" in _refused(["--data-generation", "dataset",
                                        "--raw-data-file", "train.txt"], capsys)


def test_arch_flags_must_agree_with_the_checkpoint(tmp_path: Path) -> None:
    sd = reference_state([5, 7, 3], DIM, [6, 8, DIM], [6, 1])
    save_like_reference(sd, tmp_path / "m.pt")
    r = run_adapter(["--load-model", str(tmp_path / "m.pt"), "--arch-embedding-size", "5-7-4",
                     "--arch-mlp-top", "6-1", "--num-batches", "1"], None, check=False)
    assert r.returncode == 2
    assert ("--arch-embedding-size 5-7-4 disagree(s) with --load-model" in r.stderr
            and "which is --arch-embedding-size 5-7-3 --arch-sparse-feature-size 4" in r.stderr)


@needs_mpirun
def test_reference_example_command_matches_our_flags(tmp_path: Path) -> None:
    """Issue 12's command with small sizes, under mpirun, against the same run in our flags."""
    sd = reference_state(SIZES, DIM, [DENSE, 8, DIM], [6, 1], learned=True)
    save_like_reference(sd, tmp_path / "m.pt")
    write_processed(tmp_path / "kaggle_processed.npz", 8, SIZES)
    theirs, ours = tmp_path / "theirs.npy", tmp_path / "ours.npy"
    run_adapter(["--inference-only", "--load-model", str(tmp_path / "m.pt"),
                 "--arch-sparse-feature-size", "4", "--arch-mlp-bot", "13-8-4",
                 "--arch-mlp-top", "6-1", "--arch-embedding-size", "-".join(map(str, SIZES)),
                 "--data-generation", "random", "--num-indices-per-lookup", "1",
                 "--num-indices-per-lookup-fixed", "1", "--mini-batch-size", "32",
                 "--num-batches", "3", "--data-set", "kaggle", "--processed-data-file",
                 str(tmp_path / "kaggle_processed.npz"), "--numpy-rand-seed", "727",
                 "--dist-backend", "mpi", "--no-progress", "--warmup", "0",
                 "--save-predictions", str(theirs)], 2)
    run_adapter(["--load-model", str(tmp_path / "m.pt"), "--pooling", "1", "--batch-size", "32",
                 "--num-batches", "3", "--seed", "727", "--backend", "mpi", "--no-progress",
                 "--warmup", "0", "--save-predictions", str(ours)], 2)
    got = np.load(theirs)
    assert got.shape == (96,) and np.std(got) > 1e-3
    assert got.tobytes() == np.load(ours).tobytes()


def test_dataset_generation_sizes_tables_like_the_reference(tmp_path: Path) -> None:
    """--data-generation dataset: tables from the file's counts, capped by --max-ind-range."""
    from dlrm_adapter.cli import build_arch
    write_processed(tmp_path / "p.npz", 20, SIZES)
    args = parse_args(["--data-generation", "dataset", "--processed-data-file",
                       str(tmp_path / "p.npz"), "--max-ind-range", "6",
                       "--arch-sparse-feature-size", "4", "--arch-mlp-bot", "5-8-4",
                       "--arch-mlp-top", "6-1", "--launcher", "mpi"])
    arch, state = build_arch(args)
    assert state is None
    assert arch.table_sizes == tuple(min(n, 6) for n in SIZES)
    assert arch.bot_dims == (13, 8, 4)  # the input width comes from the data
    assert arch.top_dims == (4 + 27 * 26 // 2, 6, 1)


def test_weighted_pooling_flag_must_agree_with_the_checkpoint() -> None:
    from dlrm_adapter.reference_flags import checkpoint_arch
    plain = arch_from_state_dict(_base())
    learned = arch_from_state_dict(reference_state([5, 7, 3], DIM, [DENSE, 8, DIM], [6, 1],
                                                   learned=True))
    args = parse_args(["--weighted-pooling", "learned", "--load-model", "m.pt",
                       "--launcher", "mpi"])
    with pytest.raises(ValueError, match=r"--weighted-pooling learned disagree\(s\) with "
                                         r"--load-model m.pt"):
        checkpoint_arch(args, plain)
    assert checkpoint_arch(args, learned).weighted_pooling == "learned"
    args = parse_args(["--weighted-pooling", "fixed", "--load-model", "m.pt", "--launcher", "mpi"])
    assert checkpoint_arch(args, plain).weighted_pooling == "fixed"
    with pytest.raises(ValueError, match="--weighted-pooling fixed disagree"):
        checkpoint_arch(args, learned)


def test_random_generation_defaults_to_the_reference_lookups() -> None:
    assert parse_args(["--data-generation", "random", "--launcher", "mpi"]).pooling == "1:10"
    assert parse_args(["--data-generation", "random", "--pooling", "2",
                       "--launcher", "mpi"]).pooling == "2"
    assert parse_args(["--launcher", "mpi"]).pooling == "1"  # our default is unchanged
