# CompletionQueue, AddressVector and Endpoint.


cdef class CompletionQueue:
    """One CQ in FI_CQ_FORMAT_DATA, bound to the endpoint for both transmit and
    receive, so a single read makes progress on both directions."""

    cdef fid_cq* cq
    cdef readonly Domain domain

    def __cinit__(self, Domain domain not None, size_t size=0):
        cdef fi_cq_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.format = FI_CQ_FORMAT_DATA
        attr.wait_obj = FI_WAIT_NONE
        attr.size = size
        self.cq = NULL
        self.domain = domain
        check(fi_cq_open(domain.domain, &attr, &self.cq, NULL), "fi_cq_open", domain.provider)

    def close(self):
        cdef fid_cq* cq = self.cq
        if cq != NULL:
            self.cq = NULL
            close_fid(&cq.fid, "cq", self.domain.provider)

    def __dealloc__(self):
        try:
            self.close()
        except FabricError:
            pass  # nowhere to report from here


cdef class AddressVector:
    """``fi_av`` in table mode: peer i's address is the i-th inserted name."""

    cdef fid_av* av
    cdef readonly Domain domain

    def __cinit__(self, Domain domain not None, size_t count):
        cdef fi_av_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.type = FI_AV_TABLE
        attr.count = count
        self.av = NULL
        self.domain = domain
        check(fi_av_open(domain.domain, &attr, &self.av, NULL), "fi_av_open", domain.provider)

    cdef int insert(self, bytes name, fi_addr_t* out) except -1:
        cdef int ret = fi_av_insert(self.av, <const char*>name, 1, out, 0, NULL)
        if ret != 1:
            check(ret if ret < 0 else -FI_EAVAIL, "fi_av_insert", self.domain.provider)
        return 0

    def close(self):
        cdef fid_av* av = self.av
        if av != NULL:
            self.av = NULL
            close_fid(&av.fid, "av", self.domain.provider)

    def __dealloc__(self):
        try:
            self.close()
        except FabricError:
            pass  # nowhere to report from here


cdef class Endpoint:
    """An RDM endpoint bound to one CQ and one AV, enabled on construction."""

    cdef fid_ep* ep
    cdef readonly Domain domain
    cdef readonly CompletionQueue cq
    cdef readonly AddressVector av
    cdef readonly bint selective_completion
    cdef readonly str region_name       # shm only: the name of our region in /dev/shm

    def __cinit__(self, Domain domain not None, CompletionQueue cq not None,
                  AddressVector av not None, str region_name=None):
        self.ep = NULL
        self.region_name = None
        self.domain, self.cq, self.av = domain, cq, av
        prov = domain.provider
        check(fi_endpoint(domain.domain, domain.fabric.info.info, &self.ep, NULL), "fi_endpoint", prov)
        # Selective completion lets writes skip the local completion entirely;
        # a provider that refuses it gets every write signalled (and reaped).
        self.selective_completion = fi_ep_bind(
            self.ep, &cq.cq.fid, FI_TRANSMIT | FI_RECV | FI_SELECTIVE_COMPLETION) == 0
        if not self.selective_completion:
            check(fi_ep_bind(self.ep, &cq.cq.fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)", prov)
        check(fi_ep_bind(self.ep, &av.av.fid, 0), "fi_ep_bind(av)", prov)
        if prov == "shm":
            # shm names its region "<pid>:<domain>:<endpoint>" in /dev/shm by
            # default. A killed process leaves that file behind, and a later
            # process that reuses the pid then fails fi_enable with EBUSY. Our
            # own name (random unless the caller derives one from its job) never
            # collides with a stale one, and lets the job unlink it early.
            if region_name is None:
                region_name = f"blsfab-{os.getpid():x}-{secrets.token_hex(8)}"
            elif not (0 < len(region_name) <= 128 and
                      all(c.isascii() and (c.isalnum() or c in "-_.") for c in region_name)
                      and region_name[0] != "."):
                raise ValueError(f"region_name={region_name!r}: use up to 128 characters "
                                 "from [A-Za-z0-9_.-], not starting with '.'")
            name = region_name.encode() + b"\0"
            check(fi_setname(&self.ep.fid, <char*>name, len(name)), "fi_setname", prov)
            self.region_name = region_name
        check(fi_enable(self.ep), "fi_enable", prov)

    def unlink_region(self):
        """Drop the name of our shm region once every peer has mapped it: the
        region then lives only in the mappings, so no death leaves it behind.
        True if a name was removed; a no-op off shm."""
        if self.region_name is None:
            return False
        return unlink_segment("/" + self.region_name)

    def name(self):
        """The endpoint's address, to be handed to peers for their AV."""
        cdef char buf[256]
        cdef size_t length = sizeof(buf)
        check(fi_getname(&self.ep.fid, buf, &length), "fi_getname", self.domain.provider)
        return PyBytes_FromStringAndSize(buf, length)

    def close(self):
        cdef fid_ep* ep = self.ep
        if ep != NULL:
            self.ep = NULL
            close_fid(&ep.fid, "endpoint", self.domain.provider)

    def __dealloc__(self):
        try:
            self.close()
        except FabricError:
            pass  # nowhere to report from here
