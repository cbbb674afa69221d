"""Entry point: ``mpirun -np N python -m dlrm_adapter [options]``."""
import os
import sys

# Ask MKL for alignment-independent (conditionally reproducible) results before torch
# loads it; the row-stable chunking in model.py relies on GEMMs being deterministic
# for a given shape.  An explicit MKL_CBWR in the environment wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

from .cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
