# cython: language_level=3
"""blsfab._core: thin wrappers over libfabric and the ring engine built on them.

As in mpi4py, this is one extension made of one included file per class.
"""

include "_core/common.pxi"
include "_core/info.pyx"
include "_core/fabric.pyx"
include "_core/endpoint.pyx"
include "_core/memory.pyx"
include "_core/buffers.pyx"
include "_core/shared.pyx"
include "_core/ring_types.pxi"
include "_core/ring_state.pyx"
include "_core/ring_receive.pyx"
include "_core/ring_progress.pyx"
include "_core/ring_send.pyx"
include "_core/engine.pyx"
include "_core/views.pyx"
include "_core/request.pyx"
include "_core/collective.pyx"
