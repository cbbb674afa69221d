# Fabric and Domain: the provider instance and its resource domain.


cdef class Fabric:
    """``fi_fabric`` for one FabricInfo."""

    cdef fid_fabric* fabric
    cdef readonly FabricInfo info

    def __cinit__(self, FabricInfo info not None):
        self.fabric = NULL
        self.info = info
        check(fi_fabric(info.info.fabric_attr, &self.fabric, NULL), "fi_fabric", info.provider)

    def close(self):
        cdef fid_fabric* f = self.fabric
        if f != NULL:
            self.fabric = NULL
            close_fid(&f.fid, "fabric", self.info.provider)

    def __dealloc__(self):
        try:
            self.close()
        except FabricError:
            pass  # nowhere to report from here


cdef class Domain:
    """``fi_domain``: owns memory registrations, the CQ, the AV and the endpoint."""

    cdef fid_domain* domain
    cdef readonly Fabric fabric

    def __cinit__(self, Fabric fabric not None):
        self.domain = NULL
        self.fabric = fabric
        check(fi_domain(fabric.fabric, fabric.info.info, &self.domain, NULL),
              "fi_domain", fabric.info.provider)

    @property
    def provider(self):
        return self.fabric.info.provider

    def close(self):
        cdef fid_domain* d = self.domain
        if d != NULL:
            self.domain = NULL
            close_fid(&d.fid, "domain", self.provider)

    def __dealloc__(self):
        try:
            self.close()
        except FabricError:
            pass  # nowhere to report from here
