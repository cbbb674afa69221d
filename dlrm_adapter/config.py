"""Dataset shapes, model architecture and seeded random streams.

Every random quantity in the adapter (weights, synthetic data, injected
delays) is drawn from ``numpy.random.default_rng([seed, STREAM, ...])``.  The
stream tags below keep the draws independent of each other and, crucially,
independent of the number of ranks: a stream is keyed by *what* is drawn
(table ``t`` of batch ``b``), never by who draws it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

# Stream tags for numpy SeedSequence entropy lists.
STREAM_TABLE_INIT = 11
STREAM_BOT_INIT = 12
STREAM_TOP_INIT = 13
STREAM_DENSE = 21
STREAM_SPARSE = 22
STREAM_TABLE_POOLING = 24
STREAM_DELAY = 31


def rng(seed: int, *stream: int) -> np.random.Generator:
    """A numpy Generator keyed by ``seed`` and a stream path of non-negative ints."""
    return np.random.default_rng([int(seed), *(int(s) for s in stream)])


@dataclass(frozen=True)
class DatasetSpec:
    """Shapes of a dataset and of the reference DLRM used for it."""

    name: str
    table_sizes: Tuple[int, ...]
    dense_dim: int
    emb_dim: int
    bot_hidden: Tuple[int, ...]  # bottom MLP layer widths after the input; last == emb_dim
    top_hidden: Tuple[int, ...]  # top MLP layer widths after the interaction; last == 1


CRITEO_KAGGLE = DatasetSpec(
    name="criteo-kaggle",
    table_sizes=(1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                 8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18,
                 15, 286181, 105, 142572),
    dense_dim=13,
    emb_dim=16,
    bot_hidden=(512, 256, 64, 16),
    top_hidden=(512, 256, 1),
)

# Ali-CCP has no dense block of its own in the commonly used preprocessing; we
# attach a small one (8 features: think log-scaled user/item counters) and a
# correspondingly small bottom MLP 8-64-16.  See docs/dlrm.md.
ALI_CCP = DatasetSpec(
    name="ali-ccp",
    table_sizes=(238635, 98, 14, 3, 8, 4, 4, 3, 5, 467298, 6929, 263942, 106399, 5888,
                 104830, 51878, 37148, 4),
    dense_dim=8,
    emb_dim=16,
    bot_hidden=(64, 16),
    top_hidden=(512, 256, 1),
)

DATASETS = {spec.name: spec for spec in (CRITEO_KAGGLE, ALI_CCP)}


def interaction_dim(num_tables: int, emb_dim: int) -> int:
    """Width of cat([x, strictly-lower-triangle of pairwise dots of x and all embeddings])."""
    f = num_tables + 1
    return emb_dim + f * (f - 1) // 2


@dataclass(frozen=True)
class ModelArch:
    """Everything needed to build the DLRM network."""

    table_sizes: Tuple[int, ...]
    emb_dim: int
    bot_dims: Tuple[int, ...]  # including the dense input width; last == emb_dim
    top_dims: Tuple[int, ...]  # including the interaction width; last == 1
    # Per-row pooling weights as the reference's --weighted-pooling: None (plain sum),
    # "fixed" (all ones) or "learned" (v_W_l.{t} of a checkpoint, ones when made from a seed).
    weighted_pooling: Optional[str] = None

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    @property
    def dense_dim(self) -> int:
        return self.bot_dims[0]

    def validate(self) -> None:
        if self.num_tables < 1:
            raise ValueError("the model needs at least one embedding table")
        bad = [n for n in self.table_sizes if n < 1]
        if bad:
            raise ValueError(f"embedding table sizes must be >= 1, got {bad}")
        if self.bot_dims[-1] != self.emb_dim:
            raise ValueError(f"bottom MLP output width {self.bot_dims[-1]} must equal the "
                             f"embedding dimension {self.emb_dim}")
        want = interaction_dim(self.num_tables, self.emb_dim)
        if self.top_dims[0] != want:
            raise ValueError(f"top MLP input width {self.top_dims[0]} does not match the dot "
                             f"interaction width {want} for {self.num_tables} tables of dim "
                             f"{self.emb_dim}")
        if self.top_dims[-1] != 1:
            raise ValueError(f"top MLP must end in one output, got {self.top_dims[-1]}")
        if self.weighted_pooling not in WEIGHTED_POOLING:
            raise ValueError(f"--weighted-pooling must be fixed or learned, "
                             f"got {self.weighted_pooling!r}")

    def describe(self) -> str:
        """The architecture in the reference's flags, to name it in errors."""
        wp = f" --weighted-pooling {self.weighted_pooling}" if self.weighted_pooling else ""
        return (f"--arch-embedding-size {'-'.join(map(str, self.table_sizes))} "
                f"--arch-sparse-feature-size {self.emb_dim} "
                f"--arch-mlp-bot {'-'.join(map(str, self.bot_dims))} "
                f"--arch-mlp-top {'-'.join(map(str, self.top_dims[1:]))}{wp}")


WEIGHTED_POOLING = (None, "fixed", "learned")


def arch_from_dims(table_sizes: Sequence[int], emb_dim: int, bot_dims: Sequence[int],
                   top_hidden: Sequence[int], weighted_pooling: Optional[str] = None) -> ModelArch:
    """An architecture given as the reference's --arch-* flags: the top MLP widths
    exclude its input, which is the dot interaction width."""
    arch = ModelArch(table_sizes=tuple(int(n) for n in table_sizes), emb_dim=int(emb_dim),
                     bot_dims=tuple(int(n) for n in bot_dims),
                     top_dims=(interaction_dim(len(table_sizes), int(emb_dim)),
                               *(int(n) for n in top_hidden)),
                     weighted_pooling=weighted_pooling)
    arch.validate()
    return arch


def arch_for(spec: DatasetSpec, rows_cap: Optional[int] = None) -> ModelArch:
    """The reference architecture for ``spec``, with every table capped at ``rows_cap`` rows."""
    sizes: Sequence[int] = spec.table_sizes
    if rows_cap is not None:
        if rows_cap < 1:
            raise ValueError(f"--rows-cap must be >= 1, got {rows_cap}")
        sizes = [min(n, rows_cap) for n in sizes]
    return arch_from_dims(sizes, spec.emb_dim, (spec.dense_dim, *spec.bot_hidden),
                          spec.top_hidden)
