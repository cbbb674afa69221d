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
        if self.fabric != NULL:
            fi_close(&self.fabric.fid)
            self.fabric = NULL

    def __dealloc__(self):
        self.close()


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
        if self.domain != NULL:
            fi_close(&self.domain.fid)
            self.domain = NULL

    def __dealloc__(self):
        self.close()
