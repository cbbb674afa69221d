# RegisteredBuffer: whole pages of memory with one memory registration.

# Access rights, by name, for RegisteredBuffer.
MR_ACCESS = {"write": FI_WRITE, "remote_write": FI_REMOTE_WRITE}


cdef class RegisteredBuffer:
    """``nbytes`` of zeroed memory, rounded up to whole pages and mapped on
    its own, registered with ``access`` rights.

    Whole pages because verbs pins registered pages and marks them
    MADV_DONTFORK: a page shared with unrelated heap data would vanish from
    a forked child, and its neighbours would be pinned too. Provider-chosen
    keys (FI_MR_PROV_KEY) are read back after registration; otherwise
    ``requested_key`` is used, and it must be unique in the domain. With
    FI_MR_ENDPOINT the region is bound to the endpoint and enabled.
    """

    cdef char* base
    cdef readonly size_t nbytes
    cdef fid_mr* mr
    cdef void* desc
    cdef readonly uint64_t key
    cdef readonly Domain domain

    def __cinit__(self, Domain domain not None, size_t nbytes, uint64_t access,
                  uint64_t requested_key, Endpoint endpoint=None):
        cdef void* mem = NULL
        cdef size_t page = page_size()
        self.base = NULL
        self.mr = NULL
        self.domain = domain
        if nbytes > (<size_t>-1) - page:
            raise ValueError(f"cannot register {nbytes} bytes")
        self.nbytes = max((nbytes + page - 1) // page * page, page)
        # Straight from mmap, never the heap, whatever tune_malloc() did to it.
        mem = mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if mem == MAP_FAILED:
            raise MemoryError(f"cannot map {self.nbytes} bytes of ring memory")
        self.base = <char*>mem
        memset(self.base, 0, self.nbytes)  # touch every page now, not in the first iteration
        prov = domain.provider
        check(fi_mr_reg(domain.domain, self.base, self.nbytes, access, 0, requested_key, 0,
                        &self.mr, NULL), "fi_mr_reg", prov)
        cdef int mode = domain.fabric.info.info.domain_attr.mr_mode
        if mode & FI_MR_ENDPOINT:
            if endpoint is None:
                raise ValueError("FI_MR_ENDPOINT needs the endpoint to bind the region to")
            check(fi_mr_bind(self.mr, &endpoint.ep.fid, 0), "fi_mr_bind", prov)
            check(fi_mr_enable(self.mr), "fi_mr_enable", prov)
        self.key = fi_mr_key(self.mr)
        self.desc = fi_mr_desc(self.mr)

    @property
    def address(self):
        return <uint64_t>self.base

    def close(self):
        """Deregister, then free. If the provider refuses to deregister, the
        memory is deliberately leaked: the NIC may still write to it."""
        cdef fid_mr* mr = self.mr
        if mr != NULL:
            self.mr = NULL
            try:
                close_fid(&mr.fid, "mr", self.domain.provider)
            except FabricError:
                self.base = NULL  # leaked on purpose
                raise
        if self.base != NULL:
            munmap(self.base, self.nbytes)
            self.base = NULL

    def __dealloc__(self):
        try:
            self.close()
        except FabricError:
            pass  # nowhere to report from here
