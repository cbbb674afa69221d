"""DLRM inference over a bounded-lag alltoallv (blsfab) or MPI, for ``mpirun -np N``.

Run ``python -m dlrm_adapter --help``; see docs/dlrm.md.
"""
__version__ = "0.1.0"
