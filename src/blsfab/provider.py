"""Provider names and the selection policy.

Selection is a pure function of what is usable here and whether all ranks share
a host, so it can be tested for providers this machine lacks (verbs).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

VERBS = "verbs;ofi_rxm"
SHM = "shm"
TCP = "tcp;ofi_rxm"
KNOWN = (VERBS, SHM, TCP)

# Short names a user may type, mapped to the layered provider they mean.
ALIASES = {
    "verbs": VERBS, "verbs;ofi_rxm": VERBS,
    "shm": SHM,
    "tcp": TCP, "tcp;ofi_rxm": TCP,
}

# What the hints ask of each production provider, from the libfabric man pages
# (fi_verbs(7), fi_rxm(7)); the engine honours whatever mr_mode comes back.
EXPECTED_MR_MODE = {
    VERBS: ("ALLOCATED", "LOCAL", "PROV_KEY", "VIRT_ADDR"),
    SHM: ("VIRT_ADDR",),
    TCP: (),
}


def canonical(name: str) -> str:
    """Map a user's provider name to libfabric's, e.g. "tcp" -> "tcp;ofi_rxm"."""
    key = name.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    if ";" in key or key.isidentifier():
        return key  # another libfabric provider string: let fi_getinfo judge it
    raise ValueError(f"provider={name!r} is not a libfabric provider name; "
                     f"use one of {sorted(set(ALIASES))}")


def select(requested: Optional[str], usable: Iterable[str], same_host: bool,
           environ: Optional[dict] = None) -> str:
    """Choose the provider for this rank.

    An explicit ``requested`` wins, then ``FI_PROVIDER``; otherwise verbs;ofi_rxm
    when usable, then shm when every rank shares this host, else tcp;ofi_rxm.
    """
    env = os.environ if environ is None else environ
    usable = list(usable)
    if requested is None and env.get("FI_PROVIDER"):
        requested = env["FI_PROVIDER"]
    if requested is not None:
        name = canonical(requested)
        if name not in usable:
            raise ValueError(f"provider {name!r} is not usable on this host (usable: {usable}); "
                             "pick one of those or unset FI_PROVIDER")
        return name
    if VERBS in usable:
        return VERBS
    if same_host and SHM in usable:
        return SHM
    if TCP in usable:
        return TCP
    raise ValueError(f"no provider fit for RDM RMA writes with remote CQ data here "
                     f"(usable: {usable}); install libfabric with shm or tcp support")


def check_agreement(choices: Sequence[str]) -> str:
    """Every rank must choose the same provider; name the ones that did not."""
    first = choices[0]
    odd = [r for r, c in enumerate(choices) if c != first]
    if odd:
        detail = ", ".join(f"rank {r}: {c!r}" for r, c in enumerate(choices))
        raise ValueError(f"ranks disagree on the provider ({detail}); set the same "
                         "provider= (or FI_PROVIDER) on every rank")
    return first
