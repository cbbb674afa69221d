# Shared imports and helpers for every included file.

from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t, INT64_MAX
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset, strdup, strncpy
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED
from posix.unistd cimport sysconf, _SC_PAGESIZE
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.bytes cimport PyBytes_FromStringAndSize

from blsfab.libfabric cimport *

cimport cython

cimport numpy as cnp

import os
import secrets

import numpy as np

from blsfab.errors import BrokenError, ClosedError, FabricError, TimeoutError as BlsTimeoutError

cnp.import_array()

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec* req, timespec* rem)

cdef extern from "blsfab/wire.h" nogil:
    ctypedef struct bls_slot_header_t:
        uint64_t seq
        uint64_t credit
        uint64_t first_iteration
        uint32_t nrecords
        uint32_t magic
    ctypedef struct bls_record_header_t:
        uint64_t word
    ctypedef struct bls_address_header_t:
        uint32_t magic
        uint16_t version
        uint16_t header_bytes
        uint32_t rank
        uint32_t size
        uint64_t slot_bytes
        uint32_t ring_slots
        uint32_t name_bytes
        uint64_t ring_bytes
    ctypedef struct bls_ring_address_t:
        uint64_t addr
        uint64_t key
    uint32_t BLS_ADDRESS_MAGIC, BLS_ADDRESS_VERSION, BLS_MAX_NAME_BYTES
    uint64_t BLS_RECORD_MAX_NBYTES
    uint64_t bls_record_pack(uint64_t nbytes, uint16_t dtype)
    uint64_t bls_record_nbytes(uint64_t word)
    uint16_t bls_record_dtype(uint64_t word)
    uint32_t BLS_KIND_DATA, BLS_KIND_CREDIT, BLS_IMM_WANT, BLS_SLOT_MAGIC, BLS_MAX_RANKS, BLS_MAX_RING_SLOTS
    uint32_t bls_imm_encode(uint32_t kind, uint32_t rank, uint64_t count)
    uint32_t bls_imm_kind(uint64_t imm)
    int bls_imm_wants(uint64_t imm)
    uint32_t bls_imm_rank(uint64_t imm)
    int32_t bls_imm_count_delta(uint64_t imm, uint64_t floor)
    size_t bls_align(size_t n)
    size_t bls_single_record_bytes(size_t n)

# Overhead of one record in its own slot; the largest message is slot_bytes minus this.
cdef size_t slot_overhead = sizeof(bls_slot_header_t) + sizeof(bls_record_header_t)
SLOT_OVERHEAD = slot_overhead


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline str fi_error_text(int ret):
    return fi_strerror(-ret if ret < 0 else ret).decode(errors="replace")


cdef int check(int ret, str what, str provider) except -1:
    """Raise FabricError for a negative libfabric return code."""
    if ret < 0:
        text = fi_error_text(ret)
        raise FabricError(f"{what} failed on provider {provider!r}: {text} ({-ret})",
                          provider=provider, errno=-ret, strerror=text)
    return 0
BLS_MAX_RING_SLOTS_PY = BLS_MAX_RING_SLOTS


cdef int close_fid(fid* f, str what, str provider) except -1:
    """fi_close with its return code checked: a resource the provider will not
    release is reported, not forgotten."""
    return check(fi_close(f), f"fi_close({what})", provider)


cdef size_t page_size():
    return <size_t>sysconf(_SC_PAGESIZE)
