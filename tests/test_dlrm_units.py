"""In-process tests of the DLRM adapter: placement, data, reader, checkpoints, row stability."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrm_adapter.config import ALI_CCP, CRITEO_KAGGLE, ModelArch, arch_for  # noqa: E402
from dlrm_adapter.data import (CriteoTSVSource, Pooling, SyntheticSource, bounded_zipf,  # noqa: E402
                               hash_category, parse_float_range, read_criteo_tsv)
from dlrm_adapter.model import DLRM, arch_from_state_dict, chunk_plan, make_mlp  # noqa: E402
from dlrm_adapter.sharding import (ExchangeLayout, batch_slices, place_tables,  # noqa: E402
                                   split_evenly)

torch.set_num_threads(1)


# ------------------------------------------------------------------ sharding

def test_contiguous_placement_matches_reference_split() -> None:
    tables = place_tables("contiguous", 4, CRITEO_KAGGLE.table_sizes, [1.0] * 26)
    assert [len(t) for t in tables] == [7, 7, 6, 6]
    assert [t for ts in tables for t in ts] == list(range(26))


@pytest.mark.parametrize("strategy", ["balanced-rows", "balanced-cost"])
def test_balanced_placements_cover_every_table_once(strategy: str) -> None:
    costs = [float(1 + (7 * t) % 11) for t in range(26)]
    tables = place_tables(strategy, 3, CRITEO_KAGGLE.table_sizes, costs)
    assert sorted(t for ts in tables for t in ts) == list(range(26))


def test_balanced_cost_evens_out_lookups() -> None:
    costs = [100.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    sizes = [10] * 8
    load = lambda tables: max(sum(costs[t] for t in ts) for ts in tables)  # noqa: E731
    assert load(place_tables("contiguous", 2, sizes, costs)) == 202.0
    assert load(place_tables("balanced-cost", 2, sizes, costs)) == 103.0
    rows = place_tables("balanced-rows", 2, [1000, 10, 10, 10, 10, 10, 10, 10], costs)
    assert rows[0] == [0] and len(rows[1]) == 7


def test_bad_placement_is_named() -> None:
    with pytest.raises(ValueError, match="'roundrobin'"):
        place_tables("roundrobin", 2, [1, 2], [1.0, 1.0])


def test_batch_slices_first_ranks_take_extra() -> None:
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    assert batch_slices(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert batch_slices(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_chunk_plan_is_aligned_to_global_rows() -> None:
    assert chunk_plan(0, 10, 4) == [(0, 4, 0), (4, 8, 0), (8, 10, 0)]
    assert chunk_plan(3, 10, 4) == [(0, 1, 3), (1, 5, 0), (5, 7, 0)]
    assert chunk_plan(5, 5, 4) == []


# ------------------------------------------------------------------ row stability

def _simulate(world: int, placement: str, arch: ModelArch, src: SyntheticSource,
              batches: int) -> np.ndarray:
    """Every rank's step in one process with a simulated alltoallv; predictions in order."""
    tables = place_tables(placement, world, arch.table_sizes, src.mean_lookups())
    layouts = [ExchangeLayout(tuple(tuple(t) for t in tables), arch.emb_dim, r)
               for r in range(world)]
    models = [DLRM.from_seed(arch, layouts[r].my_tables, seed=5, chunk=8) for r in range(world)]
    out: List[np.ndarray] = []
    with torch.inference_mode():
        for b in range(batches):
            size = src.size_of(b)
            sl = batch_slices(size, world)
            sends, bottoms = [], []
            for r in range(world):
                lb = src.local_batch(b, layouts[r].my_tables, *sl[r])
                sends.append(models[r].apply_emb(lb.sparse, size))
                bottoms.append(models[r].bottom_rows(torch.from_numpy(lb.dense), sl[r][0]))
            for r in range(world):
                lo, hi = sl[r]
                flat = torch.cat([sends[s][lo:hi].reshape(-1) for s in range(world)])
                assert flat.numel() == sum(layouts[r].recvcounts(size))
                ly = layouts[r].assemble(flat, hi - lo)
                out.append(models[r].top_rows(bottoms[r], ly, lo).numpy())
    return np.concatenate(out)


def test_predictions_bitwise_equal_for_any_split() -> None:
    arch = arch_for(ALI_CCP, rows_cap=300)
    src = SyntheticSource(arch, batch_size=29, num_batches=3, seed=3, pooling=Pooling(1, 5),
                          zipf=1.2)
    ref = _simulate(1, "contiguous", arch, src, 3)
    assert len(np.unique(ref)) > 0.9 * len(ref)  # not saturated: equality is meaningful
    for world, placement in [(2, "contiguous"), (3, "balanced-rows"), (5, "balanced-cost")]:
        got = _simulate(world, placement, arch, src, 3)
        assert got.tobytes() == ref.tobytes(), (world, placement)


def test_ranks_without_tables_or_samples() -> None:
    arch = ModelArch(table_sizes=(30, 20, 10), emb_dim=4, bot_dims=(8, 4), top_dims=(10, 6, 1))
    src = SyntheticSource(arch, batch_size=4, num_batches=2, seed=1, pooling=Pooling(1, 2))
    ref = _simulate(1, "contiguous", arch, src, 2)
    got = _simulate(6, "contiguous", arch, src, 2)  # 3 ranks own no table, 2 get no sample
    assert got.tobytes() == ref.tobytes()


def test_plain_full_batch_matmul_would_not_be_row_stable_guard() -> None:
    """The chunked path must agree with itself, and differ from nothing but rounding."""
    arch = arch_for(ALI_CCP, rows_cap=50)
    m = DLRM.from_seed(arch, range(arch.num_tables), seed=1, chunk=8)
    dense = torch.rand(21, arch.dense_dim)
    with torch.inference_mode():
        whole = m.bottom_rows(dense, 0)
        parts = torch.cat([m.bottom_rows(dense[:5], 0), m.bottom_rows(dense[5:13], 5),
                           m.bottom_rows(dense[13:], 13)])
        direct = m.bot_l(dense)
    assert torch.equal(whole, parts)
    torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ synthetic data

def test_synthetic_bags_do_not_depend_on_who_asks() -> None:
    arch = arch_for(CRITEO_KAGGLE, rows_cap=1000)
    src = SyntheticSource(arch, 40, 2, seed=9, pooling=Pooling(2, 6), zipf=None)
    a = src.local_batch(1, [0, 5, 7], 0, 40)
    b = src.local_batch(1, [7], 10, 20)
    assert np.array_equal(a.sparse[7][0], b.sparse[7][0])
    assert np.array_equal(a.sparse[7][1], b.sparse[7][1])
    assert np.array_equal(a.dense[10:20], b.dense)
    idx, off = a.sparse[0]
    lengths = np.diff(np.append(off, len(idx)))
    assert lengths.min() >= 2 and lengths.max() <= 6 and idx.max() < 1000
    c = SyntheticSource(arch, 40, 2, seed=10, pooling=Pooling(2, 6)).local_batch(1, [7], 0, 40)
    assert not np.array_equal(a.sparse[7][0], c.sparse[7][0])


def test_table_pooling_is_fixed_per_table() -> None:
    arch = arch_for(ALI_CCP, rows_cap=100)
    src = SyntheticSource(arch, 16, 1, seed=0, pooling=Pooling.parse("1:100", per_table=True))
    assert src.table_pooling is not None and len(set(src.table_pooling)) > 3
    for t in range(arch.num_tables):
        idx, off = src.bags(0, t)
        assert len(idx) == 16 * src.table_pooling[t]
        assert np.array_equal(np.diff(off), np.full(15, src.table_pooling[t]))


def test_zipf_is_bounded_and_skewed() -> None:
    g = np.random.default_rng(0)
    rows = bounded_zipf(g, 1000, 1.1, 200_000)
    assert rows.min() == 0 and rows.max() < 1000
    counts = np.bincount(rows, minlength=1000)
    assert counts[0] > 10 * counts[100] > 0
    assert bounded_zipf(g, 1, 0.5, 10).tolist() == [0] * 10
    assert bounded_zipf(g, 7, 1.0, 1000).max() <= 6


def test_ranges_reject_bad_values_by_name() -> None:
    with pytest.raises(ValueError, match="'5:2'"):
        Pooling.parse("5:2")
    with pytest.raises(ValueError, match="'x'"):
        parse_float_range("x", "--delay-ms")
    assert parse_float_range("0:10", "--delay-ms") == (0.0, 10.0)


# ------------------------------------------------------------------ Criteo TSV reader

def _criteo_line(label: str, dense: List[str], cats: List[str]) -> str:
    assert len(dense) == 13 and len(cats) == 26
    return "\t".join([label] + dense + cats) + "\n"


@pytest.fixture
def criteo_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(23):
        dense = [str(int(v)) for v in rng.integers(-2, 500, size=13)]
        cats = [f"{int(v):08x}" for v in rng.integers(0, 2**32, size=26)]
        if i % 3 == 0:
            dense[2] = ""
            cats[5] = ""
        lines.append(_criteo_line(str(i % 2), dense, cats))
    lines[4] = _criteo_line("1", [""] * 13, [""] * 26)  # a fully missing sample
    lines[7] = _criteo_line("0", ["5"] * 13, ["68fd1e64"] * 26)
    path = tmp_path / "train.txt"
    path.write_text("".join(lines))
    return path


def test_criteo_reader_parses_labels_dense_and_missing(criteo_file: Path) -> None:
    arch = arch_for(CRITEO_KAGGLE, rows_cap=97)
    labels, dense, rows = read_criteo_tsv(str(criteo_file), arch)
    assert labels.shape == (23,) and dense.shape == (23, 13) and rows.shape == (23, 26)
    assert labels[:4].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert dense.dtype == np.float32 and rows.dtype == np.int64
    assert np.all(dense[4] == 0.0)                      # missing -> log(1 + 0)
    assert np.allclose(dense[7], np.log(6.0))           # log(1 + x)
    assert dense[0, 2] == 0.0 and np.all(dense >= 0.0)  # negatives clamp to 0
    sizes = np.array(arch.table_sizes)
    assert np.all(rows >= 0) and np.all(rows < sizes)
    # the same token hashes differently per field, missing values get a stable row
    assert len(set(rows[7].tolist())) > 10
    assert rows[4, 5] == rows[0, 5] == rows[3, 5]


def test_criteo_reader_batches_and_partial_last_batch(criteo_file: Path) -> None:
    arch = arch_for(CRITEO_KAGGLE, rows_cap=97)
    src = CriteoTSVSource(str(criteo_file), arch, batch_size=10, num_batches=None)
    assert src.num_batches == 3 and [src.size_of(b) for b in range(3)] == [10, 10, 3]
    lb = src.local_batch(2, [0, 25], 1, 3)
    assert lb.size == 3 and lb.dense.shape == (2, 13)
    assert lb.sparse[25][1].tolist() == [0, 1, 2]
    limited = CriteoTSVSource(str(criteo_file), arch, batch_size=10, num_batches=1)
    assert limited.num_batches == 1


def test_criteo_reader_reports_bad_lines(tmp_path: Path) -> None:
    arch = arch_for(CRITEO_KAGGLE, rows_cap=10)
    bad = tmp_path / "bad.txt"
    bad.write_text(_criteo_line("1", ["1"] * 13, ["a"] * 26) + "0\t1\t2\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 40"):
        read_criteo_tsv(str(bad), arch)
    bad.write_text(_criteo_line("1", ["x1"] + ["1"] * 12, ["a"] * 26))
    with pytest.raises(ValueError, match="'x1'"):
        read_criteo_tsv(str(bad), arch)


def test_category_hash_is_not_salted() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "from dlrm_adapter.data import hash_category;"
            "print(hash_category(['68fd1e64', '', 'abc'], 3, 1000003).tolist())")
    outs = set()
    for salt in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=salt)
        outs.add(subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, check=True,
                                capture_output=True, text=True).stdout)
    assert len(outs) == 1
    assert outs.pop().strip() == str(hash_category(["68fd1e64", "", "abc"], 3, 1000003).tolist())


# ------------------------------------------------------------------ checkpoints

def test_arch_from_reference_state_dict() -> None:
    sd: Dict[str, torch.Tensor] = {}
    for t, n in enumerate([5, 7, 3]):
        sd[f"emb_l.{t}.weight"] = torch.zeros(n, 4)
    sd.update({f"bot_l.{k}": v for k, v in make_mlp([6, 8, 4], False).state_dict().items()})
    sd.update({f"top_l.{k}": v for k, v in make_mlp([10, 5, 1], True).state_dict().items()})
    arch = arch_from_state_dict(sd)
    assert arch.table_sizes == (5, 7, 3) and arch.bot_dims == (6, 8, 4)
    assert arch.top_dims == (10, 5, 1)
    del sd["emb_l.1.weight"]
    with pytest.raises(ValueError, match=r"numbered 0..T-1"):
        arch_from_state_dict(sd)
    sd["emb_l.1.weight"] = torch.zeros(7, 4)
    sd["top_l.0.weight"] = torch.zeros(5, 11)
    with pytest.raises(ValueError, match="top MLP input width 11"):
        arch_from_state_dict(sd)


def test_print_freq_draws_a_line_every_n_batches_whatever_the_time():
    import io

    from dlrm_adapter.report import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(10, "run", stream=out, every=3)
    for i in range(1, 11):
        bar.update(i)
    bar.close()
    counts = [line.split("] ")[1].split()[0] for line in out.getvalue().splitlines() if "] " in line]
    assert counts == ["3/10", "6/10", "9/10", "10/10"]


def test_assemble_from_per_source_pieces_equals_assemble_from_the_flat_buffer():
    # The bls backend hands over one view per source rank; gathering them in
    # one copy must give exactly what the flat buffer gives.
    tables = ((2,), (0, 3), (), (1,))
    emb_dim, rows = 3, 5
    layout = ExchangeLayout(tables, emb_dim, 0)
    pieces = [torch.arange(rows * len(ts) * emb_dim, dtype=torch.float32) + 100 * r
              for r, ts in enumerate(tables)]
    flat = torch.cat(pieces)
    want = layout.assemble(flat, rows)
    got = layout.assemble(pieces, rows)
    assert torch.equal(got, want)
    assert got.shape == (rows, 4, emb_dim)
    with pytest.raises(RuntimeError, match="from one rank"):
        layout.assemble([pieces[1], pieces[0], pieces[2], pieces[3]], rows)


# ------------------------------------------------------------------ the latency policy

def test_patience_values_and_the_auto_measure() -> None:
    from dlrm_adapter.patience import AUTO_STEPS, AUTO_WINDOW, Patience, parse_patience
    assert parse_patience("auto") is None and parse_patience("AUTO ") is None
    assert parse_patience("0") == 0.0 and parse_patience("2.5") == pytest.approx(2.5e-3)
    for bad in ("soon", "-1", "nan", "inf", ""):
        with pytest.raises(ValueError, match="--patience-ms must be auto, 0 \\(off\\)"):
            parse_patience(bad)
    assert not Patience(0.0).enabled and Patience(1e-3).seconds() == 1e-3
    auto = Patience(None)
    assert auto.enabled and auto.seconds() == 0.0  # nothing measured yet: no wait
    for s in [0.010] * AUTO_WINDOW + [0.001, 0.003] * (AUTO_WINDOW // 2):
        auto.note_work(s)
    # the mean of the last AUTO_WINDOW steps: the older slow steps have aged out
    assert auto.seconds() == pytest.approx(AUTO_STEPS * 0.002)
