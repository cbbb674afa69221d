"""DLRM (dot interaction) for inference, with facebookresearch/dlrm parameter names.

State-dict layout (as ``DLRM_Net``)::

    emb_l.{t}.weight            nn.EmbeddingBag(n_t, d, mode="sum")
    v_W_l.{t}                   (n_t,) per-row pooling weights (--weighted-pooling learned)
    bot_l.{2i}.weight/.bias     nn.Sequential(Linear, ReLU, Linear, ReLU, ...)
    top_l.{2i}.weight/.bias     nn.Sequential(Linear, ReLU, ..., Linear, Sigmoid)

With weighted pooling every lookup of row ``i`` is scaled by the row's weight
before the bag sum, on the rank that owns the table, so the exchange carries
pooled vectors exactly as without it.

A rank materialises only the tables it owns; the other slots of ``emb_l`` are
parameter-free placeholders, so ``state_dict()`` keys stay the reference ones.

Row-stable execution: torch's CPU GEMM gives bitwise different rows for
different numbers of rows (blocking differs with the matrix shape).  The MLPs
and the interaction are therefore always run on fixed-size chunks of ``chunk``
rows aligned to *global* sample positions (chunk ``c`` covers samples
``[c*chunk, (c+1)*chunk)`` of the batch), zero-padded where a rank holds only
part of a chunk.  Every sample is then computed with the same shapes at the
same row position no matter how the batch is split over ranks.
"""
from __future__ import annotations

import math
import os
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .config import STREAM_BOT_INIT, STREAM_TABLE_INIT, STREAM_TOP_INIT, ModelArch, rng

StateDict = Dict[str, torch.Tensor]


# ------------------------------------------------------------------ initialisation

def init_table(seed: int, t: int, rows: int, dim: int) -> torch.Tensor:
    """Table ``t`` drawn uniformly from +-sqrt(1/rows) (reference init), from its own stream."""
    g = rng(seed, STREAM_TABLE_INIT, t)
    bound = np.float32(math.sqrt(1.0 / rows))
    w = g.random((rows, dim), dtype=np.float32)
    w *= np.float32(2.0)
    w -= np.float32(1.0)
    w *= bound
    return torch.from_numpy(w)


def init_mlp(prefix: str, dims: Sequence[int], seed: int, stream: int) -> StateDict:
    """Reference MLP init: W ~ N(0, sqrt(2/(in+out))), b ~ N(0, sqrt(1/out)), per layer stream."""
    out: StateDict = {}
    for i in range(len(dims) - 1):
        m, n = dims[i], dims[i + 1]
        g = rng(seed, stream, i)
        w = g.normal(0.0, math.sqrt(2.0 / (m + n)), size=(n, m)).astype(np.float32)
        b = g.normal(0.0, math.sqrt(1.0 / n), size=n).astype(np.float32)
        out[f"{prefix}.{2 * i}.weight"] = torch.from_numpy(w)
        out[f"{prefix}.{2 * i}.bias"] = torch.from_numpy(b)
    return out


def make_mlp(dims: Sequence[int], sigmoid_last: bool) -> nn.Sequential:
    """Linear+ReLU pairs; the last activation is Sigmoid when ``sigmoid_last``."""
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=True))
        last = i == len(dims) - 2
        layers.append(nn.Sigmoid() if (last and sigmoid_last) else nn.ReLU())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ row chunks

def chunk_plan(lo: int, hi: int, chunk: int) -> List[Tuple[int, int, int]]:
    """Pieces of global rows ``[lo, hi)`` by aligned chunks: ``(local_start, local_end, row_in_chunk)``."""
    plan = []
    g = lo
    while g < hi:
        c0 = (g // chunk) * chunk
        end = min(hi, c0 + chunk)
        plan.append((g - lo, end - lo, g - c0))
        g = end
    return plan


# ------------------------------------------------------------------ the network

class DLRM(nn.Module):
    """Inference-only DLRM owning the embedding tables ``local_tables``."""

    def __init__(self, arch: ModelArch, local_tables: Iterable[int],
                 table_weight: Callable[[int], torch.Tensor], mlp_state: Mapping[str, torch.Tensor],
                 chunk: int = 64,
                 pooling_weight: Optional[Callable[[int], torch.Tensor]] = None) -> None:
        super().__init__()
        arch.validate()
        if chunk < 1:
            raise ValueError(f"--chunk must be >= 1, got {chunk}")
        self.arch = arch
        self.chunk = chunk
        self.local_tables: Tuple[int, ...] = tuple(sorted(set(local_tables)))
        for t in self.local_tables:
            if not 0 <= t < arch.num_tables:
                raise ValueError(f"table {t} does not exist (the model has {arch.num_tables})")
        # table -> (rows,) float32 weights of its rows, local tables only
        self.v_W_l: Dict[int, torch.Tensor] = {}
        mods: List[nn.Module] = []
        for t, rows in enumerate(arch.table_sizes):
            if t in self.local_tables:
                w = table_weight(t).to(torch.float32).contiguous()
                if tuple(w.shape) != (rows, arch.emb_dim):
                    raise ValueError(f"emb_l.{t}.weight has shape {tuple(w.shape)}, "
                                     f"expected {(rows, arch.emb_dim)}")
                mods.append(nn.EmbeddingBag(rows, arch.emb_dim, mode="sum", _weight=w))
                if arch.weighted_pooling:
                    v = pooling_weight(t) if pooling_weight else torch.ones(rows)
                    v = v.to(torch.float32).contiguous()
                    if tuple(v.shape) != (rows,):
                        raise ValueError(f"v_W_l.{t} has shape {tuple(v.shape)}, expected "
                                         f"({rows},): one pooling weight per row of emb_l.{t}")
                    self.v_W_l[t] = v
            else:
                mods.append(nn.Identity())  # table lives on another rank
        self.emb_l = nn.ModuleList(mods)
        self.bot_l = make_mlp(arch.bot_dims, sigmoid_last=False)
        self.top_l = make_mlp(arch.top_dims, sigmoid_last=True)
        for prefix, seq in (("bot_l", self.bot_l), ("top_l", self.top_l)):
            sub = {k[len(prefix) + 1:]: v for k, v in mlp_state.items() if k.startswith(prefix + ".")}
            try:
                seq.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"cannot load {prefix}: {exc}") from None
        f = arch.num_tables + 1
        # (i, j) for i in range(f) for j in range(i), as flat positions i * f + j of Z
        flat = [i * f + j for i in range(f) for j in range(i)]
        self.register_buffer("_tril", torch.tensor(flat, dtype=torch.long), persistent=False)
        self.eval()
        self.requires_grad_(False)

    # -------------------------------------------------------------- constructors

    @classmethod
    def from_seed(cls, arch: ModelArch, local_tables: Iterable[int], seed: int,
                  chunk: int = 64) -> "DLRM":
        """Reference init; pooling weights (if any) start at one, as the reference's do."""
        mlp = {**init_mlp("bot_l", arch.bot_dims, seed, STREAM_BOT_INIT),
               **init_mlp("top_l", arch.top_dims, seed, STREAM_TOP_INIT)}
        return cls(arch, local_tables,
                   lambda t: init_table(seed, t, arch.table_sizes[t], arch.emb_dim), mlp, chunk)

    @classmethod
    def from_state_dict(cls, arch: ModelArch, local_tables: Iterable[int], state: StateDict,
                        chunk: int = 64) -> "DLRM":
        def table(t: int) -> torch.Tensor:
            key = f"emb_l.{t}.weight"
            if key not in state:
                raise ValueError(f"checkpoint lacks {key}")
            return state[key].detach().clone()

        def pooling(t: int) -> torch.Tensor:
            if arch.weighted_pooling == "fixed":
                return torch.ones(arch.table_sizes[t])
            key = f"v_W_l.{t}"
            if key not in state:
                raise ValueError(f"checkpoint lacks {key} (--weighted-pooling learned needs the "
                                 f"learned weights of every table)")
            return state[key].detach().clone()
        mlp = {k: v.detach() for k, v in state.items() if k.startswith(("bot_l.", "top_l."))}
        return cls(arch, local_tables, table, mlp, chunk, pooling)

    # -------------------------------------------------------------- pieces of a step

    def apply_emb(self, sparse: Mapping[int, Tuple[np.ndarray, np.ndarray]],
                  batch_size: int) -> torch.Tensor:
        """Pooled embeddings of the local tables for the whole batch: ``(B, n_local, d)``."""
        outs = []
        for t in self.local_tables:
            idx, offsets = sparse[t]
            rows = torch.from_numpy(idx)
            bag = self.emb_l[t]
            v = self.v_W_l.get(t)
            if v is None:
                outs.append(bag(rows, torch.from_numpy(offsets)))
            else:  # scale each lookup by its row's weight, then sum the bag
                outs.append(bag(rows, torch.from_numpy(offsets),
                                per_sample_weights=v.index_select(0, rows)))
        if not outs:
            return torch.empty(batch_size, 0, self.arch.emb_dim)
        return torch.stack(outs, dim=1)

    def interact(self, x: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
        """cat([x, strictly-lower triangle of (T T^T)]) with T = [x, emb_0, ..., emb_{F-1}]."""
        t = torch.cat([x.unsqueeze(1), ly], dim=1)
        z = torch.bmm(t, t.transpose(1, 2))
        return torch.cat([x, z.flatten(1).index_select(1, self._tril)], dim=1)

    def bottom_rows(self, dense: torch.Tensor, lo: int) -> torch.Tensor:
        """Bottom MLP for global rows ``[lo, lo + len(dense))``, row-stably chunked."""
        n = dense.shape[0]
        out = torch.empty(n, self.arch.emb_dim)
        for a, e, off in chunk_plan(lo, lo + n, self.chunk):
            buf = torch.zeros(self.chunk, dense.shape[1])
            buf[off:off + e - a] = dense[a:e]
            out[a:e] = self.bot_l(buf)[off:off + e - a]
        return out

    def top_rows(self, x: torch.Tensor, ly: torch.Tensor, lo: int) -> torch.Tensor:
        """Interaction + top MLP for global rows ``[lo, lo + len(x))``: click probabilities (n,)."""
        n = x.shape[0]
        out = torch.empty(n)
        for a, e, off in chunk_plan(lo, lo + n, self.chunk):
            bx = torch.zeros(self.chunk, x.shape[1])
            bly = torch.zeros(self.chunk, ly.shape[1], ly.shape[2])
            bx[off:off + e - a] = x[a:e]
            bly[off:off + e - a] = ly[a:e]
            p = self.top_l(self.interact(bx, bly))
            out[a:e] = p[off:off + e - a, 0]
        return out


# ------------------------------------------------------------------ checkpoints

_EMB = re.compile(r"^emb_l\.(\d+)\.weight$")
_LIN = re.compile(r"^(bot_l|top_l)\.(\d+)\.weight$")
_POOL = re.compile(r"^v_W_l\.(\d+)$")
_QR = re.compile(r"^emb_l\.(\d+)\.weight_[qr]$")
_MD = re.compile(r"^emb_l\.(\d+)\.(embs|proj)\.weight$")
_DDP = re.compile(r"^(bot_l|top_l)\.module\.")


def _reference_save_globals() -> List[object]:
    """What the reference's ``--save-model`` pickles besides tensors: ``test_acc`` and
    ``train_loss`` (and ``total_loss``/``test_auc``) are numpy float64/float32 scalars.

    A numpy scalar unpickles through ``multiarray.scalar`` (spelt ``numpy._core`` by
    numpy 2, ``numpy.core`` by numpy 1) and its ``dtype``, whose state is set on the
    dtype's class.  Nothing else is allowed.
    """
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: List[object] = [(scalar, "numpy._core.multiarray.scalar"),
                             (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 names the dtype classes
    if dtypes is not None:
        allowed += [dtypes.Float64DType, dtypes.Float32DType]
    return allowed


def load_checkpoint(path: str, trust: bool = False) -> StateDict:
    """A reference checkpoint as a flat state dict (accepts ``{"state_dict": ...}`` too).

    Loaded with ``weights_only=True`` unless ``trust``, allowing only the numpy
    scalars the reference's save format holds; memory-mapped when the file format
    allows, so ranks only touch the tables they own.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--load-model: no such file {path!r}")
    obj = None
    for mmap in (True, False):
        try:
            with torch.serialization.safe_globals(_reference_save_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
            break
        except Exception as exc:  # noqa: BLE001 - torch raises several types here
            if mmap and "mmap" in str(exc).lower():
                continue
            if not trust:
                raise ValueError(f"--load-model {path!r}: cannot load with weights_only=True "
                                 f"({exc}); if you trust the file, add --trust-checkpoint") from None
            raise ValueError(f"--load-model {path!r}: cannot load: {exc}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"--load-model {path!r}: expected a state_dict or a dict with a "
                         f"'state_dict' entry, got {type(obj).__name__}")
    state: StateDict = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            state[k[len("module."):] if k.startswith("module.") else k] = v
    return state


def _mlp_dims(state: StateDict, prefix: str) -> Tuple[int, ...]:
    idx = sorted(int(m.group(2)) for k in state for m in [_LIN.match(k)] if m and m.group(1) == prefix)
    if not idx:
        raise ValueError(f"checkpoint has no {prefix}.*.weight entries")
    if idx != list(range(0, 2 * len(idx), 2)):
        raise ValueError(f"{prefix} Linear layers must sit at indices 0, 2, 4, ... "
                         f"(Linear/activation pairs as in DLRM_Net); found {idx}")
    dims = [int(state[f"{prefix}.0.weight"].shape[1])]
    for i in idx:
        w = state[f"{prefix}.{i}.weight"]
        if w.dim() != 2 or int(w.shape[1]) != dims[-1]:
            raise ValueError(f"{prefix}.{i}.weight has shape {tuple(w.shape)}; its input width "
                             f"should be {dims[-1]}")
        dims.append(int(w.shape[0]))
    return tuple(dims)


def _numbers(state: StateDict, pattern: "re.Pattern[str]") -> List[int]:
    return sorted({int(m.group(1)) for k in state for m in [pattern.match(k)] if m})


def refuse_unsupported(state: StateDict) -> None:
    """Name what a reference checkpoint is when it is not a whole dot-interaction DLRM_Net."""
    if any(_DDP.match(k) for k in state):
        tables = _numbers(state, _EMB)
        raise ValueError(
            f"checkpoint is one rank's shard of a multi-rank reference run (its MLPs are "
            f"DistributedDataParallel-wrapped: bot_l.module.*, top_l.module.*) holding "
            f"{len(tables)} embedding table(s) in that rank's own numbering "
            f"(emb_l.{tables[0] if tables else 0}..); the other tables are in the other ranks' "
            f"files. To load it, merge the shards of all ranks into one state_dict: every "
            f"rank's emb_l.{{k}} renumbered to its global table number (ranks hold consecutive "
            f"tables, rank 0 first), and '.module' dropped from the MLP keys")
    qr = _numbers(state, _QR)
    if qr:
        raise ValueError(
            f"checkpoint holds quotient-remainder (QR) embeddings (--qr-flag: emb_l.{qr[0]}"
            f".weight_q/.weight_r for table(s) {qr}); QR embeddings are not supported by "
            f"dlrm_adapter (the combining operation is not stored in the file); retrain "
            f"without --qr-flag to load the model here")
    md = _numbers(state, _MD)
    if md:
        raise ValueError(
            f"checkpoint holds mixed-dimension (MD) embeddings (--md-flag: emb_l.{md[0]}"
            f".embs.weight/.proj.weight for table(s) {md}); MD embeddings are not supported "
            f"by dlrm_adapter; retrain without --md-flag to load the model here")


def arch_from_state_dict(state: StateDict) -> ModelArch:
    """Infer table sizes, MLP widths and weighted pooling from reference parameter names."""
    refuse_unsupported(state)
    tables = _numbers(state, _EMB)
    if not tables:
        raise ValueError("checkpoint has no emb_l.{t}.weight entries")
    if tables != list(range(len(tables))):
        raise ValueError(f"checkpoint embedding tables must be numbered 0..T-1, found {tables}")
    shapes = [tuple(state[f"emb_l.{t}.weight"].shape) for t in tables]
    dims = {s[1] for s in shapes if len(s) == 2}
    if len(dims) != 1 or any(len(s) != 2 for s in shapes):
        raise ValueError(f"embedding tables must be 2-D with one common dimension, got {shapes}")
    pooled = _numbers(state, _POOL)
    if pooled and pooled != tables:
        missing = sorted(set(tables) - set(pooled))
        raise ValueError(f"checkpoint has learned pooling weights v_W_l.* for tables {pooled} "
                         f"but not for {missing or 'all of them'}; the reference learns them for "
                         f"every table or none")
    arch = ModelArch(table_sizes=tuple(int(s[0]) for s in shapes), emb_dim=dims.pop(),
                     bot_dims=_mlp_dims(state, "bot_l"), top_dims=_mlp_dims(state, "top_l"),
                     weighted_pooling="learned" if pooled else None)
    arch.validate()
    extra = unused_keys(state, arch)
    if extra:
        raise ValueError(
            f"checkpoint entries {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''} are "
            f"not part of the dot-interaction DLRM_Net this adapter runs; they may change the "
            f"predictions, so the file is refused rather than run without them")
    return arch


def unused_keys(state: StateDict, arch: ModelArch) -> List[str]:
    """Checkpoint entries the inference model would not use."""
    used = {f"emb_l.{t}.weight" for t in range(arch.num_tables)}
    if arch.weighted_pooling == "learned":
        used |= {f"v_W_l.{t}" for t in range(arch.num_tables)}
    for prefix, dims in (("bot_l", arch.bot_dims), ("top_l", arch.top_dims)):
        for i in range(len(dims) - 1):
            used |= {f"{prefix}.{2 * i}.weight", f"{prefix}.{2 * i}.bias"}
    return sorted(k for k in state if k not in used)
