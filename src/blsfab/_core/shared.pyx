# SharedSegment: one receiving rank's node-local rings in POSIX shared memory.

from libc.errno cimport errno, ENOENT
from libc.string cimport strerror
from posix.fcntl cimport O_CREAT, O_EXCL, O_RDWR
from posix.mman cimport mmap, munmap, shm_open, shm_unlink, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE
from posix.stat cimport fstat, struct_stat
from posix.unistd cimport ftruncate, close as close_fd

cdef extern from "blsfab/shm.h" nogil:
    ctypedef struct bls_shm_segment_header_t:
        uint64_t magic
        uint64_t nbytes
        uint64_t owner
        uint64_t ring_slots
        uint64_t slot_bytes
        uint64_t nrings
    uint64_t BLS_SHM_MAGIC
    uint64_t BLS_SHM_CACHELINE
    uint64_t bls_shm_control_bytes(uint64_t ring_slots)
    uint64_t bls_shm_ring_bytes(uint64_t ring_slots, uint64_t slot_bytes)
    uint64_t bls_shm_segment_bytes(uint64_t nrings, uint64_t ring_slots, uint64_t slot_bytes)
    void bls_shm_publish(uint64_t* landed, uint64_t seq)
    uint64_t bls_shm_landed(const uint64_t* landed)
    void bls_shm_set_consumed(uint64_t* consumed, uint64_t count)
    uint64_t bls_shm_consumed(const uint64_t* consumed)


cdef class SharedSegment:
    """A POSIX shared-memory segment holding ``nrings`` rings of ``ring_slots``
    slots of ``slot_bytes`` each (layout in include/blsfab/shm.h).

    The receiving rank ``create``s it; its node-local senders ``attach`` to it
    by name. Once every one of them has, ``unlink`` removes the name, so the
    memory lives exactly as long as the mappings and nothing is left in
    /dev/shm when a process dies.
    """

    cdef char* base
    cdef readonly size_t nbytes
    cdef readonly str name
    cdef readonly int owner
    cdef readonly int nrings
    cdef readonly uint64_t ring_slots, slot_bytes
    cdef readonly bint linked      # the name still exists (we created it, not yet unlinked)

    def __cinit__(self):
        self.base = NULL
        self.linked = False

    @staticmethod
    def create(str name not None, int owner, int nrings, uint64_t ring_slots, uint64_t slot_bytes):
        """Create and map a new segment; fails if ``name`` exists."""
        cdef SharedSegment self = SharedSegment._new(name, owner, nrings, ring_slots, slot_bytes)
        cdef bytes cname = name.encode()
        cdef int fd = shm_open(cname, O_CREAT | O_EXCL | O_RDWR, 0o600)
        if fd < 0:
            raise _os_error(f"shm_open({name!r}, O_CREAT|O_EXCL)", errno,
                            "a stale segment of an earlier job may hold the name; remove it "
                            "from /dev/shm, or use local='fabric'")
        self.linked = True
        if ftruncate(fd, self.nbytes) != 0:
            err = errno
            close_fd(fd)
            self.unlink()
            raise _os_error(f"ftruncate({name!r}, {self.nbytes})", err,
                            "/dev/shm is too small; enlarge it or use local='fabric'")
        self._map(fd)
        # Touch every page now (ftruncate gives zeros); then describe the layout.
        memset(self.base, 0, self.nbytes)
        cdef bls_shm_segment_header_t* hdr = <bls_shm_segment_header_t*>self.base
        hdr.nbytes, hdr.owner, hdr.nrings = self.nbytes, owner, nrings
        hdr.ring_slots, hdr.slot_bytes = ring_slots, slot_bytes
        hdr.magic = BLS_SHM_MAGIC
        return self

    @staticmethod
    def attach(str name not None, int owner, int nrings, uint64_t ring_slots, uint64_t slot_bytes):
        """Map a peer's segment, checking that it has the agreed size and layout."""
        cdef SharedSegment self = SharedSegment._new(name, owner, nrings, ring_slots, slot_bytes)
        cdef bytes cname = name.encode()
        cdef struct_stat st
        cdef int fd = shm_open(cname, O_RDWR, 0)
        if fd < 0:
            raise _os_error(f"shm_open({name!r})", errno,
                            f"rank {owner} has not created it, or it was already unlinked")
        if fstat(fd, &st) != 0 or <uint64_t>st.st_size != self.nbytes:
            close_fd(fd)
            raise ValueError(f"shared segment {name!r} of rank {owner} is {st.st_size} bytes, "
                             f"not the agreed {self.nbytes}; ranks disagree on ring sizes")
        self._map(fd)
        cdef bls_shm_segment_header_t* hdr = <bls_shm_segment_header_t*>self.base
        if (hdr.magic != BLS_SHM_MAGIC or hdr.nbytes != self.nbytes or hdr.owner != <uint64_t>owner
                or hdr.nrings != <uint64_t>nrings or hdr.ring_slots != ring_slots
                or hdr.slot_bytes != slot_bytes):
            self.close()
            raise ValueError(f"shared segment {name!r} does not describe rank {owner}'s rings "
                             f"({nrings} x {ring_slots} slots of {slot_bytes} bytes)")
        return self

    @staticmethod
    cdef SharedSegment _new(str name, int owner, int nrings, uint64_t ring_slots,
                            uint64_t slot_bytes):
        cdef SharedSegment self = SharedSegment.__new__(SharedSegment)
        check_segment_name(name)
        if nrings < 0 or owner < 0:
            raise ValueError(f"nrings={nrings} and owner={owner} must not be negative")
        cdef uint64_t n = bls_shm_segment_bytes(nrings, ring_slots, slot_bytes)
        if n == 0 or slot_bytes % 8 or n > (<uint64_t>1 << 47):
            raise ValueError(f"{nrings} rings of {ring_slots} slots of {slot_bytes} bytes do not "
                             "make a valid shared segment (zero, unaligned or too large)")
        self.name, self.owner, self.nrings = name, owner, nrings
        self.ring_slots, self.slot_bytes = ring_slots, slot_bytes
        self.nbytes = n
        return self

    cdef int _map(self, int fd) except -1:
        cdef void* p = mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        cdef int err = errno
        close_fd(fd)  # the mapping keeps the memory
        if p == MAP_FAILED:
            self.unlink()
            raise _os_error(f"mmap({self.name!r}, {self.nbytes})", err, "")
        self.base = <char*>p
        return 0

    # ---- layout (no GIL) ----------------------------------------------------

    cdef inline char* ring_base(self, int i) noexcept nogil:
        return self.base + BLS_SHM_CACHELINE + <size_t>i * bls_shm_ring_bytes(self.ring_slots,
                                                                              self.slot_bytes)

    cdef inline uint64_t* consumed_word(self, int i) noexcept nogil:
        return <uint64_t*>self.ring_base(i)

    cdef inline uint64_t* landed_words(self, int i) noexcept nogil:
        return <uint64_t*>(self.ring_base(i) + BLS_SHM_CACHELINE)

    cdef inline char* slots(self, int i) noexcept nogil:
        return self.ring_base(i) + bls_shm_control_bytes(self.ring_slots)

    # ---- Python access, for tests and tools -----------------------------------

    cdef int _check_ring(self, int ring, uint64_t seq, size_t n) except -1:
        if self.base == NULL:
            raise ValueError(f"shared segment {self.name!r} is closed")
        if not 0 <= ring < self.nrings:
            raise IndexError(f"ring {ring} not in 0..{self.nrings - 1}")
        if n > self.slot_bytes:
            raise ValueError(f"{n} bytes do not fit a {self.slot_bytes}-byte slot")
        return 0

    def publish(self, int ring, uint64_t seq, const unsigned char[::1] payload):
        """Store ``payload`` into slot ``seq`` of ``ring``, then publish it
        (release). The caller owns the credit check: see ``consumed``."""
        cdef size_t n = payload.shape[0]
        self._check_ring(ring, seq, n)
        cdef size_t pos = seq % self.ring_slots
        if n:
            memcpy(self.slots(ring) + pos * self.slot_bytes, &payload[0], n)
        bls_shm_publish(self.landed_words(ring) + pos, seq)

    def landed(self, int ring, uint64_t seq, size_t nbytes):
        """The first ``nbytes`` of slot ``seq`` if it has been published
        (acquire), else None."""
        self._check_ring(ring, seq, nbytes)
        cdef size_t pos = seq % self.ring_slots
        if bls_shm_landed(self.landed_words(ring) + pos) != seq + 1:
            return None
        return PyBytes_FromStringAndSize(self.slots(ring) + pos * self.slot_bytes, nbytes)

    def consumed(self, int ring):
        """Slots of ``ring`` the receiver has freed (acquire)."""
        self._check_ring(ring, 0, 0)
        return bls_shm_consumed(self.consumed_word(ring))

    def set_consumed(self, int ring, uint64_t count):
        self._check_ring(ring, 0, 0)
        bls_shm_set_consumed(self.consumed_word(ring), count)

    # ---- lifetime -----------------------------------------------------------

    def unlink(self):
        """Remove the name (the mappings stay valid). Idempotent."""
        if self.linked:
            self.linked = False
            unlink_segment(self.name)

    cdef void forget(self) noexcept:
        """Keep the mapping for the life of the process (views still read it)."""
        self.base = NULL

    def close(self):
        if self.base != NULL:
            munmap(self.base, self.nbytes)
            self.base = NULL

    def __dealloc__(self):
        if self.linked:
            shm_unlink(self.name.encode())
        if self.base != NULL:
            munmap(self.base, self.nbytes)

    def __repr__(self):
        return (f"<blsfab.SharedSegment {self.name!r} rank={self.owner} rings={self.nrings} "
                f"{self.nbytes} bytes{' linked' if self.linked else ''}>")


def check_segment_name(str name):
    """A POSIX shm name blsfab may use: '/', then 1 to 200 of [A-Za-z0-9_.-]."""
    if not (2 <= len(name) <= 201 and name[0] == "/"
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name[1:])):
        raise ValueError(f"shared segment name {name!r} must be '/' followed by 1 to 200 "
                         "letters, digits, '_', '.' or '-'")


def unlink_segment(str name):
    """shm_unlink ``name``; True if it existed. A missing name is not an error."""
    check_segment_name(name)
    if shm_unlink(name.encode()) == 0:
        return True
    if errno == ENOENT:
        return False
    raise _os_error(f"shm_unlink({name!r})", errno, "")


def shm_segment_bytes(int nrings, uint64_t ring_slots, uint64_t slot_bytes):
    """Bytes of a segment with these rings (the mapped memory it costs)."""
    return bls_shm_segment_bytes(nrings, ring_slots, slot_bytes)


cdef object _os_error(str what, int err, str fix):
    text = strerror(err).decode(errors="replace")
    return OSError(err, f"{what} failed: {text}" + (f"; {fix}" if fix else ""))
