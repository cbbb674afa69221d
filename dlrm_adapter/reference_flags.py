"""The command line of facebookresearch/dlrm (``dlrm_s_pytorch.py``), for inference.

A user of the reference can keep its flags: ``add_reference_flags`` registers them
next to ours, and ``apply_reference_flags`` maps them onto our options before the
defaults are filled in.  Every reference flag is one of:

- an alias of one of ours (``--mini-batch-size`` is ``--batch-size``); given together,
  the two must agree;
- given the reference's behaviour (``--arch-*`` build the model, ``--max-ind-range``
  caps tables and takes categories modulo it);
- refused in one line: training-only flags (this is inference only) and the model
  variants we do not run.

The synthetic architecture of ``--arch-*`` must agree with a checkpoint loaded at the
same time (``checkpoint_arch``); a mismatch names both.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, List, Sequence, Tuple

from .config import ModelArch, arch_from_dims
from .data import CRITEO_DENSE, read_processed_counts
from .launch import env_rank

REFERENCE = "facebookresearch/dlrm"

# dlrm_s_pytorch.py's defaults for the architecture, used for the parts not given.
ARCH_DEFAULTS = {"arch_sparse_feature_size": (2,), "arch_embedding_size": (4, 3, 2),
                 "arch_mlp_bot": (4, 3, 2), "arch_mlp_top": (4, 2, 1)}
ARCH_FLAGS = {k: "--" + k.replace("_", "-") for k in ARCH_DEFAULTS}

# Training-only flags of the reference: refused, this is inference only.
TRAINING_ONLY = (
    "--nepochs", "--learning-rate", "--optimizer", "--loss-function", "--loss-weights",
    "--loss-threshold", "--round-targets", "--sync-dense-params", "--save-model",
    "--test-freq", "--test-mini-batch-size", "--test-num-workers", "--data-randomize",
    "--data-sub-sample-rate", "--dataset-multiprocessing", "--lr-num-warmup-steps",
    "--lr-decay-start-step", "--lr-num-decay-steps", "--mlperf-grad-accum-iter",
    "--mlperf-acc-threshold", "--mlperf-auc-threshold", "--mlperf-logging",
    "--mlperf-bin-loader", "--mlperf-bin-shuffle",
)
# Reference flags for what dlrm_adapter does not run, with the reason.
UNSUPPORTED = {
    "--arch-interaction-itself": "the dot interaction here excludes self-interactions",
    "--md-flag": "mixed-dimension embeddings are not supported",
    "--md-threshold": "mixed-dimension embeddings are not supported",
    "--md-temperature": "mixed-dimension embeddings are not supported",
    "--md-round-dims": "mixed-dimension embeddings are not supported",
    "--qr-flag": "quotient-remainder embeddings are not supported",
    "--qr-threshold": "quotient-remainder embeddings are not supported",
    "--qr-operation": "quotient-remainder embeddings are not supported",
    "--qr-collisions": "quotient-remainder embeddings are not supported",
    "--activation-function": "the MLPs use ReLU",
    "--quantize-mlp-with-bit": "weights stay float32",
    "--quantize-emb-with-bit": "weights stay float32",
    "--use-gpu": "inference runs on CPU",
    "--save-onnx": "no ONNX export",
    "--data-size": "synthetic data is sized by --mini-batch-size and --num-batches",
    "--rand-data-dist": "synthetic indices are uniform (or --zipf ALPHA)",
    "--rand-data-min": "synthetic dense features are uniform in [0, 1)",
    "--rand-data-max": "synthetic dense features are uniform in [0, 1)",
    "--rand-data-mu": "synthetic dense features are uniform in [0, 1)",
    "--rand-data-sigma": "synthetic dense features are uniform in [0, 1)",
    "--data-trace-file": "no trace input",
    "--data-trace-enable-padding": "no trace input",
    "--memory-map": "--processed-data streams the rows it needs from one file",
}
DIST_BACKENDS = ("mpi", "gloo")


class ReferenceFlagError(ValueError):
    """A reference flag that cannot be honoured; the message is one line."""


def _dash_ints(text: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected dash-separated integers, got {text!r}") \
            from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _reference_bool(text: str) -> bool:
    """The reference parses ``type=bool``: any non-empty value, even ``0``, is True."""
    if str(text).strip().lower() in ("1", "true", "yes"):
        return True
    raise argparse.ArgumentTypeError(
        f"{text!r} would be read as True by {REFERENCE} (argparse type=bool); give 1 for a "
        f"fixed count, or leave the flag out for a random count per bag")


class _Refuse(argparse.Action):
    """Records a refused flag; ``apply_reference_flags`` reports the first one."""

    def __init__(self, option_strings: Sequence[str], dest: str, reason: str, **kw) -> None:
        super().__init__(option_strings, dest, nargs="?", default=None,
                         help=argparse.SUPPRESS, **kw)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        if getattr(namespace, "reference_refused", None) is None:
            namespace.reference_refused = f"{option_string}: {self.reason}"


def add_reference_flags(parser: argparse.ArgumentParser) -> None:
    """Register ``--processed-data`` and the reference's flags on ``parser``."""
    parser.set_defaults(reference_refused=None)
    g = parser.add_argument_group(
        f"{REFERENCE} flags (inference; see docs/dlrm.md, 'Coming from facebookresearch/dlrm')")
    a = g.add_argument
    a("--processed-data", "--processed-data-file", dest="processed_data", metavar="FILE.npz",
      help="the reference's processed Criteo Kaggle/Terabyte file (X_int, X_cat, y, counts): "
           "categories as the reference numbered them")
    a("--arch-sparse-feature-size", type=int, metavar="D", help="embedding dimension")
    a("--arch-embedding-size", type=_dash_ints, metavar="N1-N2-...", help="rows of each table")
    a("--arch-mlp-bot", type=_dash_ints, metavar="I-H-...-D", help="bottom MLP widths")
    a("--arch-mlp-top", type=_dash_ints, metavar="H-...-1",
      help="top MLP widths after the interaction")
    a("--arch-interaction-op", choices=("dot", "cat"), help="dot (cat is not supported)")
    a("--weighted-pooling", metavar="fixed|learned",
      help="scale every lookup by its row's weight before the bag sum (fixed: ones; learned: "
           "v_W_l.* of --load-model)")
    a("--data-generation", choices=("random", "dataset", "internal"),
      help="random: synthetic data; dataset: --processed-data-file")
    a("--num-indices-per-lookup", type=int, metavar="L", help="lookups per bag (reference: 10)")
    a("--num-indices-per-lookup-fixed", type=_reference_bool, metavar="1",
      help="exactly L lookups per bag (else 1..L at random)")
    a("--data-set", choices=("kaggle", "terabyte"),
      help="which Criteo file --processed-data-file is")
    a("--raw-data-file", metavar="PATH",
      help="only with --processed-data-file (not preprocessed here)")
    a("--max-ind-range", type=int, metavar="M",
      help="cap tables at M rows, categories modulo M (with --processed-data)")
    a("--mini-batch-size", type=int, metavar="B", help="= --batch-size")
    a("--numpy-rand-seed", type=int, metavar="S", help="= --seed")
    a("--inference-only", action="store_true", help="accepted: this is always inference")
    a("--print-freq", type=int, metavar="N",
      help="a progress line every N batches (rank 0, stderr)")
    a("--dist-backend", metavar="mpi|gloo", help="= --backend mpi|gloo")
    for flag in TRAINING_ONLY:
        g.add_argument(flag, action=_Refuse,
                       reason=f"a training flag of {REFERENCE}; dlrm_adapter is inference only "
                              f"(drop it)")
    for flag, why in UNSUPPORTED.items():
        g.add_argument(flag, action=_Refuse, reason=f"not supported by dlrm_adapter: {why}")


# ------------------------------------------------------------------ mapping

def _alias(args: argparse.Namespace, theirs: str, ours: str) -> None:
    ref, own = getattr(args, theirs), getattr(args, ours)
    if ref is None:
        return
    if own is not None and own != ref:
        raise ReferenceFlagError(
            f"--{theirs.replace('_', '-')} {ref} and --{ours.replace('_', '-')} {own} disagree; "
            f"they are the same option, give one")
    setattr(args, ours, ref)


def _map(args: argparse.Namespace) -> None:
    if args.reference_refused:
        raise ReferenceFlagError(args.reference_refused)
    if args.arch_interaction_op == "cat":
        raise ReferenceFlagError("--arch-interaction-op cat: not supported by dlrm_adapter: "
                                 "only the dot interaction")
    if args.data_generation == "internal":
        raise ReferenceFlagError("--data-generation internal: not supported by dlrm_adapter: "
                                 "use random or dataset")
    if args.weighted_pooling not in (None, "fixed", "learned"):
        raise ReferenceFlagError(f"--weighted-pooling must be fixed or learned, got "
                                 f"{args.weighted_pooling!r}")
    if args.print_freq is not None and args.print_freq < 1:
        raise ReferenceFlagError(f"--print-freq must be >= 1, got {args.print_freq}")
    if args.dist_backend:
        if args.dist_backend not in DIST_BACKENDS:
            raise ReferenceFlagError(f"--dist-backend {args.dist_backend!r}: dlrm_adapter runs "
                                     f"{' or '.join(DIST_BACKENDS)} (or --backend bls, ...)")
        _alias(args, "dist_backend", "backend")
    _alias(args, "mini_batch_size", "batch_size")
    _alias(args, "numpy_rand_seed", "seed")
    if args.max_ind_range is not None and args.max_ind_range <= 0:
        args.max_ind_range = None  # the reference's -1: no cap

    # Data: the reference reads a file only with --data-generation dataset; without
    # --data-generation, --processed-data-file is read (it is our --processed-data).
    if args.data_generation == "random":
        if args.data:
            raise ReferenceFlagError(f"--data-generation random and --data {args.data} "
                                     f"disagree: random means synthetic data")
        if args.processed_data and env_rank() in (None, 0):
            print(f"note: --data-generation random: --processed-data-file "
                  f"{args.processed_data} is not read (as in {REFERENCE})", flush=True)
        args.processed_data = None
    elif args.raw_data_file and not args.processed_data:
        raise ReferenceFlagError(
            f"--raw-data-file {args.raw_data_file}: dlrm_adapter does not run the "
            f"reference's preprocessing (category dictionaries over the whole dataset); "
            f"run it once with {REFERENCE} and pass the --processed-data-file it writes, "
            f"or use --data FILE to hash categories instead")
    if args.data_generation == "dataset" and not (args.processed_data or args.data):
        raise ReferenceFlagError("--data-generation dataset needs --processed-data-file FILE.npz")
    if args.processed_data and (args.data or args.zipf is not None or args.pooling
                                or args.table_pooling):
        raise ReferenceFlagError("--processed-data is one lookup per bag from the file; it "
                                 "cannot be combined with --data, --zipf, --pooling or "
                                 "--table-pooling")
    if args.max_ind_range is not None and args.data:
        raise ReferenceFlagError("--max-ind-range applies to --processed-data; --data hashes "
                                 "categories modulo the table sizes already")
    # The reference's random data has 1..10 lookups per bag unless told otherwise.
    reference_random = (args.data_generation == "random" and args.pooling is None
                        and not args.table_pooling)
    if (args.num_indices_per_lookup is not None or args.num_indices_per_lookup_fixed
            or reference_random):
        if not args.processed_data and not args.data:  # a file has one lookup per bag
            lookups = 10 if args.num_indices_per_lookup is None else args.num_indices_per_lookup
            if lookups < 1:
                raise ReferenceFlagError(f"--num-indices-per-lookup must be >= 1, got {lookups}")
            pooling = str(lookups) if args.num_indices_per_lookup_fixed else f"1:{lookups}"
            if args.pooling is not None and args.pooling != pooling:
                fixed = "(-fixed)" if args.num_indices_per_lookup_fixed else ""
                raise ReferenceFlagError(f"--num-indices-per-lookup{fixed} means --pooling "
                                         f"{pooling}, but --pooling {args.pooling} is given")
            args.pooling = pooling
    # The reference's --num-batches 0 (its default) means every batch of the data.
    if args.num_batches == 0:
        if not (args.processed_data or args.data):
            raise ReferenceFlagError("--num-batches 0 means every batch of a dataset; synthetic "
                                     "data needs --num-batches N >= 1")
        args.num_batches = None
    if arch_flags_given(args) and args.rows_cap is not None:
        raise ReferenceFlagError("--rows-cap caps the --dataset preset; with --arch-embedding-size "
                                 "give the table sizes themselves")


def apply_reference_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Map the reference's flags onto ours; exit with one line on the first bad one."""
    try:
        _map(args)
    except ReferenceFlagError as exc:
        parser.exit(2, f"dlrm_adapter: error: {exc}\n" if env_rank() in (None, 0) else None)


# ------------------------------------------------------------------ architecture

def arch_flags_given(args: argparse.Namespace) -> List[str]:
    """The ``--arch-*`` flags on the command line."""
    return [flag for k, flag in ARCH_FLAGS.items() if getattr(args, k, None) is not None]


def command_line_arch(args: argparse.Namespace, preset: ModelArch) -> ModelArch:
    """The model without a checkpoint: the one the reference builds from ``--arch-*``
    (its defaults for the parts not given), else ``preset``; with ``--weighted-pooling``.

    With a processed file, the tables are sized by its ``counts`` capped at
    ``--max-ind-range`` and the bottom MLP takes its dense width, as the reference does.
    """
    if not arch_flags_given(args):
        return dataclasses.replace(preset, weighted_pooling=args.weighted_pooling)
    part = {**ARCH_DEFAULTS, **_given_parts(args)}
    sizes: Sequence[int] = part["arch_embedding_size"]
    bot = part["arch_mlp_bot"]
    if args.processed_data:
        bot = (CRITEO_DENSE, *bot[1:])
        counts = read_processed_counts(args.processed_data)
        if counts is not None:
            sizes = [int(c) for c in counts]
            if args.max_ind_range is not None:
                sizes = [min(n, args.max_ind_range) for n in sizes]
        elif args.arch_embedding_size is None:
            raise ValueError(f"--processed-data {args.processed_data!r} has no counts (a "
                             f"per-day file); give --arch-embedding-size or --load-model")
    dim = part["arch_sparse_feature_size"][0]
    if bot[-1] != dim:
        raise ValueError(f"--arch-sparse-feature-size {dim} does not match the last width of "
                         f"--arch-mlp-bot {'-'.join(map(str, bot))}")
    return arch_from_dims(sizes, dim, bot, part["arch_mlp_top"], args.weighted_pooling)


def _given_parts(args: argparse.Namespace) -> Dict[str, Tuple[int, ...]]:
    """The ``--arch-*`` values given, as tuples; with a processed file the bottom MLP's
    input is the file's integer features, as the reference sets it from the data."""
    given = {k: _seq(getattr(args, k)) for k in ARCH_DEFAULTS if getattr(args, k) is not None}
    if args.processed_data and "arch_mlp_bot" in given:
        given["arch_mlp_bot"] = (CRITEO_DENSE, *given["arch_mlp_bot"][1:])
    return given


def checkpoint_arch(args: argparse.Namespace, arch: ModelArch) -> ModelArch:
    """The checkpoint's architecture once checked against the ``--arch-*`` flags given;
    ``--weighted-pooling fixed`` applies to a checkpoint without learned weights."""
    have = {"arch_sparse_feature_size": (arch.emb_dim,), "arch_embedding_size": arch.table_sizes,
            "arch_mlp_bot": arch.bot_dims, "arch_mlp_top": arch.top_dims[1:]}
    bad = [f"{ARCH_FLAGS[k]} {'-'.join(map(str, v))}" for k, v in _given_parts(args).items()
           if v != tuple(have[k])]
    wp = args.weighted_pooling
    if wp is not None and wp != arch.weighted_pooling and not (
            wp == "fixed" and arch.weighted_pooling is None):
        bad.append(f"--weighted-pooling {wp}")
    if bad:
        raise ValueError(f"{' '.join(bad)} disagree(s) with --load-model {args.load_model}, "
                         f"which is {arch.describe()}")
    if wp == "fixed":
        arch = dataclasses.replace(arch, weighted_pooling="fixed")
    return arch


def _seq(v: object) -> Tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),)  # type: ignore
