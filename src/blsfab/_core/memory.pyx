# RegisteredBuffer: page-aligned memory with one memory registration.


cdef class RegisteredBuffer:
    """``nbytes`` of page-aligned, zeroed memory registered with ``access`` rights.

    Provider-chosen keys (FI_MR_PROV_KEY) are read back after registration;
    otherwise ``requested_key`` is used, and it must be unique in the domain.
    With FI_MR_ENDPOINT the region is bound to the endpoint and enabled.
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
        self.base = NULL
        self.mr = NULL
        self.domain = domain
        self.nbytes = max(nbytes, 64)
        if posix_memalign(&mem, 4096, self.nbytes) != 0:
            raise MemoryError(f"cannot allocate {self.nbytes} bytes of ring memory")
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
        if self.mr != NULL:
            fi_close(&self.mr.fid)
            self.mr = NULL
        if self.base != NULL:
            free(self.base)
            self.base = NULL

    def __dealloc__(self):
        self.close()
