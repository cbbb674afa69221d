"""Input batches: deterministic synthetic data and a Criteo Kaggle TSV reader.

A *source* produces global batch ``b`` for any caller.  The rank that owns
table ``t`` asks for that table's indices over the whole global batch; every
rank asks for the dense rows of its own slice.  Synthetic values are drawn
from streams keyed by ``(seed, batch, table)`` so they do not depend on how
many ranks there are or which rank asks.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

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


class CriteoTSVSource:
    """Batches of consecutive lines of a Criteo TSV file (one lookup per bag).

    The file is parsed once (up to ``batch_size * num_batches`` lines); the last
    batch may be shorter than ``batch_size``.
    """

    def __init__(self, path: str, arch: ModelArch, batch_size: int,
                 num_batches: Optional[int]) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        max_rows = None if num_batches is None else batch_size * num_batches
        self.labels_all, self.dense_all, self.rows_all = read_criteo_tsv(path, arch, max_rows)
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


Source = Union[SyntheticSource, CriteoTSVSource]
