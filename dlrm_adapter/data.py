"""Input batches: deterministic synthetic data, a Criteo Kaggle TSV reader and a
reader of the reference DLRM's processed Criteo files (``.npz``).

A *source* produces global batch ``b`` for any caller.  The rank that owns
table ``t`` asks for that table's indices over the whole global batch; every
rank asks for the dense rows of its own slice.  Synthetic values are drawn
from streams keyed by ``(seed, batch, table)`` so they do not depend on how
many ranks there are or which rank asks.
"""
from __future__ import annotations

import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import STREAM_DENSE, STREAM_SPARSE, STREAM_TABLE_POOLING, ModelArch, rng

# (indices, offsets) of one table for a whole batch, as EmbeddingBag takes them.
Bags = Tuple[np.ndarray, np.ndarray]


@dataclass
class LocalBatch:
    """What one rank needs of global batch ``index``."""

    index: int
    size: int                      # global batch size
    dense: np.ndarray              # (hi - lo, dense_dim) float32, rows lo..hi of the batch
    sparse: Dict[int, Bags]        # table -> bags over the whole global batch
    labels: Optional[np.ndarray]   # (size,) float32 when the source has labels


@dataclass(frozen=True)
class Pooling:
    """Lookups per bag: fixed ``lo == hi``, random per bag in [lo, hi], or per table."""

    lo: int
    hi: int
    per_table: bool = False

    @classmethod
    def parse(cls, text: str, per_table: bool = False) -> "Pooling":
        flag = "--table-pooling" if per_table else "--pooling"
        lo, hi = parse_int_range(text, flag)
        if lo < 1:
            raise ValueError(f"{flag} needs at least one lookup per bag, got {text!r}")
        return cls(lo, hi, per_table)

    def mean(self) -> float:
        return (self.lo + self.hi) / 2.0


def parse_int_range(text: str, flag: str) -> Tuple[int, int]:
    """``"L"`` -> (L, L); ``"A:B"`` -> (A, B) with A <= B."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ValueError(f"{flag} expects an integer N or a range A:B, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
        raise ValueError(f"{flag} expects N or A:B with 0 <= A <= B, got {text!r}")
    return parts[0], parts[1]


def parse_float_range(text: str, flag: str) -> Tuple[float, float]:
    """``"X"`` -> (X, X); ``"A:B"`` -> (A, B) with 0 <= A <= B."""
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        raise ValueError(f"{flag} expects a number X or a range A:B, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not (0 <= parts[0] <= parts[1]) or not math.isfinite(parts[1]):
        raise ValueError(f"{flag} expects X or A:B with 0 <= A <= B, got {text!r}")
    return parts[0], parts[1]


def bounded_zipf(gen: np.random.Generator, n: int, alpha: float, size: int) -> np.ndarray:
    """Row indices in [0, n) with P(row k) roughly proportional to (k + 1) ** -alpha.

    Inverse-CDF sampling of the continuous power law on [1, n + 1), floored, so it
    works for any alpha > 0 and any table size without a per-table CDF table.
    Row 0 is the hottest.
    """
    u = gen.random(size)
    if abs(alpha - 1.0) < 1e-12:
        x = np.power(float(n + 1), u)
    else:
        e = 1.0 - alpha
        x = np.power((math.pow(n + 1, e) - 1.0) * u + 1.0, 1.0 / e)
    k = np.floor(x).astype(np.int64) - 1
    return np.clip(k, 0, n - 1)


class SyntheticSource:
    """Random DLRM inputs, identical for every caller given the same seed."""

    def __init__(self, arch: ModelArch, batch_size: int, num_batches: int, seed: int,
                 pooling: Pooling, zipf: Optional[float] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if num_batches < 1:
            raise ValueError(f"--num-batches must be >= 1, got {num_batches}")
        if zipf is not None and not zipf > 0:
            raise ValueError(f"--zipf ALPHA must be > 0, got {zipf}")
        self.arch = arch
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.pooling = pooling
        self.zipf = zipf
        self.has_labels = False
        self.table_pooling: Optional[List[int]] = None
        if pooling.per_table:
            g = rng(seed, STREAM_TABLE_POOLING)
            self.table_pooling = [int(v) for v in
                                  g.integers(pooling.lo, pooling.hi + 1, size=arch.num_tables)]

    def size_of(self, b: int) -> int:
        return self.batch_size

    def mean_lookups(self) -> List[float]:
        """Expected lookups per bag of every table (the cost used by balanced-cost)."""
        if self.table_pooling is not None:
            return [float(v) for v in self.table_pooling]
        return [self.pooling.mean()] * self.arch.num_tables

    def bags(self, b: int, t: int) -> Bags:
        n = self.batch_size
        g = rng(self.seed, STREAM_SPARSE, b, t)
        if self.table_pooling is not None:
            lengths = np.full(n, self.table_pooling[t], dtype=np.int64)
        elif self.pooling.lo == self.pooling.hi:
            lengths = np.full(n, self.pooling.lo, dtype=np.int64)
        else:
            lengths = g.integers(self.pooling.lo, self.pooling.hi + 1, size=n, dtype=np.int64)
        offsets = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        total = int(lengths.sum())
        rows = self.arch.table_sizes[t]
        if self.zipf is None:
            idx = g.integers(0, rows, size=total, dtype=np.int64)
        else:
            idx = bounded_zipf(g, rows, self.zipf, total)
        return idx, offsets

    def local_batch(self, b: int, tables: Sequence[int], lo: int, hi: int) -> LocalBatch:
        n = self.batch_size
        dense = rng(self.seed, STREAM_DENSE, b).random((n, self.arch.dense_dim), dtype=np.float32)
        return LocalBatch(index=b, size=n, dense=np.ascontiguousarray(dense[lo:hi]),
                          sparse={t: self.bags(b, t) for t in tables}, labels=None)

    def labels(self, b: int) -> Optional[np.ndarray]:
        return None


# --------------------------------------------------------------------- Criteo TSV

CRITEO_DENSE = 13
CRITEO_SPARSE = 26
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def hash_category(tokens: Sequence[str], field: int, rows: int) -> np.ndarray:
    """Deterministic row for each categorical token of ``field`` in a table of ``rows`` rows.

    ``crc32(token)`` (stable across processes, unlike ``hash()``), combined with the
    field number and mixed by splitmix64, modulo the table size.  A missing value is
    the empty token and gets a row of its own like any other category.
    """
    keys = np.fromiter((zlib.crc32(tok.encode("utf-8")) for tok in tokens),
                       dtype=np.uint64, count=len(tokens))
    keys |= np.uint64(field + 1) << np.uint64(32)
    return (splitmix64(keys) % np.uint64(rows)).astype(np.int64)


def _dense_value(tok: str, path: str, lineno: int) -> float:
    if tok == "":
        return 0.0
    try:
        v = float(int(tok))
    except ValueError:
        raise ValueError(f"{path}:{lineno}: integer feature expected, got {tok!r}") from None
    return v if v > 0 else 0.0


def read_criteo_tsv(path: str, arch: ModelArch, max_rows: Optional[int] = None
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse a Criteo Kaggle ``train.txt``-style file.

    Each line: label, 13 integer features, 26 categorical (hex) features, tab
    separated; any feature may be empty.  Returns ``(labels (N,) float32, dense
    (N, 13) float32 = log(1 + max(x, 0)) with missing = 0, rows (N, 26) int64)``
    with categories hashed into ``arch.table_sizes``.
    """
    if arch.num_tables != CRITEO_SPARSE or arch.dense_dim != CRITEO_DENSE:
        raise ValueError(f"--data reads Criteo Kaggle files (13 dense, 26 sparse); the model "
                         f"has {arch.dense_dim} dense and {arch.num_tables} sparse inputs")
    labels: List[float] = []
    dense: List[List[float]] = []
    cats: List[List[str]] = [[] for _ in range(CRITEO_SPARSE)]
    width = 1 + CRITEO_DENSE + CRITEO_SPARSE
    with open(path, "r", encoding="utf-8", newline="") as fh:
        for lineno, line in enumerate(fh, 1):
            if max_rows is not None and len(labels) >= max_rows:
                break
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != width:
                raise ValueError(f"{path}:{lineno}: expected {width} tab-separated fields "
                                 f"(label, 13 integer, 26 categorical), got {len(fields)}")
            try:
                labels.append(float(int(fields[0])))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: label must be 0 or 1, got {fields[0]!r}") \
                    from None
            dense.append([_dense_value(tok, path, lineno) for tok in fields[1:1 + CRITEO_DENSE]])
            for f, tok in enumerate(fields[1 + CRITEO_DENSE:]):
                cats[f].append(tok.strip())
    if not labels:
        raise ValueError(f"{path}: no samples found")
    dense_arr = np.log1p(np.asarray(dense, dtype=np.float64)).astype(np.float32)
    rows = np.stack([hash_category(cats[f], f, arch.table_sizes[f])
                     for f in range(CRITEO_SPARSE)], axis=1)
    return np.asarray(labels, dtype=np.float32), dense_arr, rows


class _SamplesSource:
    """Batches of consecutive samples held in memory (one lookup per bag); the last
    batch may be shorter than ``batch_size``."""

    def __init__(self, arch: ModelArch, batch_size: int, labels: np.ndarray, dense: np.ndarray,
                 rows: np.ndarray) -> None:
        self.labels_all, self.dense_all, self.rows_all = labels, dense, rows
        self.arch = arch
        self.batch_size = batch_size
        n = len(self.labels_all)
        self.num_batches = (n + batch_size - 1) // batch_size
        self.has_labels = True

    def size_of(self, b: int) -> int:
        start = b * self.batch_size
        return min(self.batch_size, len(self.labels_all) - start)

    def mean_lookups(self) -> List[float]:
        return [1.0] * self.arch.num_tables

    def local_batch(self, b: int, tables: Sequence[int], lo: int, hi: int) -> LocalBatch:
        if not 0 <= b < self.num_batches:
            raise IndexError(f"batch {b} out of range: the file holds {self.num_batches}")
        start = b * self.batch_size
        n = self.size_of(b)
        offsets = np.arange(n, dtype=np.int64)
        sparse = {t: (np.ascontiguousarray(self.rows_all[start:start + n, t]), offsets)
                  for t in tables}
        return LocalBatch(index=b, size=n,
                          dense=np.ascontiguousarray(self.dense_all[start + lo:start + hi]),
                          sparse=sparse, labels=self.labels(b))

    def labels(self, b: int) -> Optional[np.ndarray]:
        start = b * self.batch_size
        return self.labels_all[start:start + self.size_of(b)]


def _max_rows(batch_size: int, num_batches: Optional[int]) -> Optional[int]:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    return None if num_batches is None else batch_size * num_batches


class CriteoTSVSource(_SamplesSource):
    """Batches of consecutive lines of a Criteo TSV file, categories hashed.

    The file is parsed once (up to ``batch_size * num_batches`` lines).
    """

    def __init__(self, path: str, arch: ModelArch, batch_size: int,
                 num_batches: Optional[int]) -> None:
        max_rows = _max_rows(batch_size, num_batches)
        super().__init__(arch, batch_size, *read_criteo_tsv(path, arch, max_rows))


# --------------------------------------------------------------------- processed .npz

def _read_exact(fh: io.BufferedIOBase, nbytes: int, what: str) -> bytes:
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{what}: truncated ({len(data)} of {nbytes} bytes)")
    return data


def _open_npz(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"--processed-data {path!r}: not a readable .npz file ({exc})") from None


def read_npz_rows(path: str, key: str, max_rows: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """The first ``max_rows`` rows of array ``key`` of an ``.npz`` file, and its row count.

    The member is decompressed as a stream, so only the rows asked for are kept
    (the processed Kaggle file holds ~45M samples); Fortran-ordered members (the
    reference's per-day files) are read column by column.  Object arrays are refused:
    nothing is unpickled.
    """
    what = f"{path}: {key}"
    with _open_npz(path) as zf:
        try:
            info = zf.getinfo(key + ".npy")
        except KeyError:
            have = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
            raise ValueError(f"--processed-data {path!r} has no array {key!r} (it has {have}); "
                             f"the reference's processed files hold X_int, X_cat, y and "
                             f"counts") from None
        with zf.open(info) as fh:
            try:
                version = np.lib.format.read_magic(fh)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(fh)
            except ValueError as exc:
                raise ValueError(f"{what}: not a .npy array ({exc})") from None
            if dtype.hasobject or dtype.kind not in "biuf" or len(shape) not in (1, 2):
                raise ValueError(f"{what}: expected a 1-D or 2-D numeric array, got "
                                 f"{dtype} of shape {shape}")
            n = int(shape[0])
            cols = int(shape[1]) if len(shape) == 2 else 1
            if n < 0 or cols < 0:
                raise ValueError(f"{what}: bad shape {shape}")
            item = dtype.itemsize
            if n * cols * item != info.file_size - fh.tell():
                raise ValueError(f"{what}: header says {shape} {dtype} "
                                 f"({n * cols * item} bytes) but the member holds "
                                 f"{info.file_size - fh.tell()}")
            k = n if max_rows is None else min(n, max_rows)
            if fortran and cols > 1:
                parts = []
                for c in range(cols):
                    parts.append(np.frombuffer(_read_exact(fh, k * item, what), dtype=dtype))
                    if c + 1 < cols:
                        fh.seek((n - k) * item, io.SEEK_CUR)
                out = np.stack(parts, axis=1)
            else:
                out = np.frombuffer(_read_exact(fh, k * cols * item, what), dtype=dtype)
                out = out.reshape((k, cols) if len(shape) == 2 else (k,))
    return out, n


def reference_dense(x_int: np.ndarray) -> np.ndarray:
    """The reference's dense transform: negatives clamped to 0 (its preprocessing does
    that), then ``log(x + 1)`` in float32 with torch, bit for bit as its data loader."""
    x = torch.from_numpy(np.maximum(x_int, 0)).to(torch.float32)
    return torch.log(x + 1).numpy()


def read_processed_counts(path: str) -> Optional[np.ndarray]:
    """The per-table category counts of a processed file (absent from per-day files)."""
    with _open_npz(path) as zf:
        if "counts.npy" not in zf.namelist():
            return None
    counts, _ = read_npz_rows(path, "counts")
    if counts.dtype.kind not in "iu" or (counts < 1).any():
        raise ValueError(f"--processed-data {path!r}: counts must be positive integers, "
                         f"got {counts.tolist()}")
    return counts.astype(np.int64)


class ProcessedSource(_SamplesSource):
    """Batches of consecutive samples of a reference processed Criteo file.

    ``kaggleAdDisplayChallenge_processed.npz``, ``terabyte_processed.npz`` or one
    day of them (``*_day_N_processed.npz``, ``*_N_reordered.npz``): ``X_int`` (N, 13)
    integer features, ``X_cat`` (N, 26) categories numbered by the reference's
    dictionaries, ``y`` (N,) labels.  Dense features get the reference's transform;
    with ``max_ind_range`` categories are taken modulo it, as the reference does.
    """

    def __init__(self, path: str, arch: ModelArch, batch_size: int,
                 num_batches: Optional[int], max_ind_range: Optional[int] = None) -> None:
        if max_ind_range is not None and max_ind_range < 1:
            raise ValueError(f"--max-ind-range must be >= 1, got {max_ind_range}")
        max_rows = _max_rows(batch_size, num_batches)
        x_int, n_int = read_npz_rows(path, "X_int", max_rows)
        x_cat, n_cat = read_npz_rows(path, "X_cat", max_rows)
        y, n_y = read_npz_rows(path, "y", max_rows)
        if not n_int == n_cat == n_y:
            raise ValueError(f"--processed-data {path!r}: X_int, X_cat and y hold {n_int}, "
                             f"{n_cat} and {n_y} samples; they must agree")
        if n_y == 0:
            raise ValueError(f"--processed-data {path!r}: no samples found")
        if x_int.ndim != 2 or x_int.shape[1] != arch.dense_dim:
            raise ValueError(f"--processed-data {path!r}: X_int has {x_int.shape[1:]} features "
                             f"per sample; the model has {arch.dense_dim} dense inputs")
        if x_cat.ndim != 2 or x_cat.shape[1] != arch.num_tables:
            raise ValueError(f"--processed-data {path!r}: X_cat has {x_cat.shape[1:]} categories "
                             f"per sample; the model has {arch.num_tables} tables")
        super().__init__(arch, batch_size, y.astype(np.float32),
                         reference_dense(x_int), self._rows(path, x_cat, arch, max_ind_range))

    @staticmethod
    def _rows(path: str, x_cat: np.ndarray, arch: ModelArch,
              max_ind_range: Optional[int]) -> np.ndarray:
        if x_cat.dtype.kind == "f":  # the reference's own files store categories as float64
            if not np.isfinite(x_cat).all() or (np.floor(x_cat) != x_cat).any():
                raise ValueError(f"--processed-data {path!r}: X_cat holds non-integer values")
            if x_cat.size and np.abs(x_cat).max() >= 2.0 ** 53:
                raise ValueError(f"--processed-data {path!r}: X_cat values exceed 2**53")
        rows = x_cat.astype(np.int64)
        if rows.size and rows.min() < 0:
            raise ValueError(f"--processed-data {path!r}: X_cat holds negative category "
                             f"{int(rows.min())}")
        if max_ind_range is not None:
            rows %= max_ind_range
        for t, size in enumerate(arch.table_sizes):
            top = int(rows[:, t].max()) if len(rows) else 0
            if top >= size:
                hint = ("" if max_ind_range is not None else
                        f"; if the model was trained with --max-ind-range {size}, add it")
                raise ValueError(f"--processed-data {path!r}: table {t} is looked up at row "
                                 f"{top} but has {size} rows{hint}")
        return np.ascontiguousarray(rows)


Source = Union[SyntheticSource, CriteoTSVSource, ProcessedSource]
