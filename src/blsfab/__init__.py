"""blsfab: a bounded-lag synchronous alltoallv over libfabric RMA.

    import blsfab
    with blsfab.Communicator(bound=4) as comm:
        req = comm.ialltoallv(sendbuf, sendcounts)
        recv = req.wait()
"""

from ._core import Request, library_version
from .communicator import Communicator, providers
from .errors import BlsError, BrokenError, ClosedError, FabricError, TimeoutError

__all__ = ["Communicator", "Request", "providers", "library_version", "BlsError",
           "BrokenError", "ClosedError", "FabricError", "TimeoutError"]
__version__ = "0.1.0"
