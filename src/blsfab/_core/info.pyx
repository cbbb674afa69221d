# FabricInfo: one fi_info, chosen for RDM endpoints with RMA writes and remote CQ data.

import os

# Every MR mode bit the engine can honour. The provider answers with the subset it needs.
MR_MODE_SUPPORTED = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT
MR_MODE_BITS = {"LOCAL": FI_MR_LOCAL, "VIRT_ADDR": FI_MR_VIRT_ADDR,
                "ALLOCATED": FI_MR_ALLOCATED, "PROV_KEY": FI_MR_PROV_KEY,
                "ENDPOINT": FI_MR_ENDPOINT, "RAW": FI_MR_RAW}
# The immediate data encoding (include/blsfab/wire.h) fits the 4 bytes verbs offers.
CQ_DATA_BYTES = 4
API_VERSION = (1, 17)


def library_version():
    """The libfabric version this process runs against, as (major, minor)."""
    cdef uint32_t v = fi_version()
    return (FI_MAJOR(v), FI_MINOR(v))


cdef dict describe_entry(fi_info* entry):
    """What choose_entry() looks at in one fi_info of the list."""
    cdef fid_nic* nic = entry.nic
    link = None
    device = None
    if nic != NULL:
        if nic.device_attr != NULL and nic.device_attr.name != NULL:
            device = nic.device_attr.name.decode(errors="replace")
        if nic.link_attr != NULL and nic.link_attr.state != FI_LINK_UNKNOWN:
            link = nic.link_attr.state == FI_LINK_UP
    return {
        "provider": entry.fabric_attr.prov_name.decode(errors="replace")
                    if entry.fabric_attr.prov_name != NULL else "",
        "fabric": entry.fabric_attr.name.decode(errors="replace")
                  if entry.fabric_attr.name != NULL else "",
        "domain": entry.domain_attr.name.decode(errors="replace")
                  if entry.domain_attr.name != NULL else "",
        "xrc": entry.ep_attr.protocol == FI_PROTO_RDMA_CM_IB_XRC,
        "device": device,
        "link_up": link,
    }


def choose_entry(list candidates, env):
    """Index of the fi_info entry to use, or None if none fits.

    Deliberate rather than first-come: XRC and datagram domains are skipped
    (blsfab wants reliable-connected queue pairs); a device named by
    FI_VERBS_DEVICE_NAME or FI_VERBS_IFACE must match the entry's domain or
    NIC (ValueError listing the choices if none does); otherwise the first
    entry whose link is up, or not known to be down, wins.
    """
    usable = [i for i, c in enumerate(candidates)
              if not c["xrc"] and not c["domain"].endswith(("-xrc", "-dgram"))]
    wanted = env.get("FI_VERBS_DEVICE_NAME") or env.get("FI_VERBS_IFACE")
    if wanted and any(candidates[i]["provider"].startswith("verbs") for i in usable):
        named = [i for i in usable
                 if wanted in (candidates[i]["domain"], candidates[i]["device"],
                               candidates[i]["domain"].split("-")[0])]
        if not named:
            raise ValueError(f"no RDMA domain matches {wanted!r} (from FI_VERBS_DEVICE_NAME / "
                             f"FI_VERBS_IFACE); available: "
                             f"{sorted({candidates[i]['domain'] for i in usable})}")
        usable = named
    for i in usable:
        if candidates[i]["link_up"] is not False:
            return i
    return None


cdef class FabricInfo:
    """An owned ``fi_info`` describing one provider's RDM endpoint."""

    cdef fi_info* info
    cdef readonly str provider
    cdef readonly dict chosen  # what choose_entry() saw of this entry

    def __cinit__(self):
        self.info = NULL

    def __dealloc__(self):
        if self.info != NULL:
            fi_freeinfo(self.info)
            self.info = NULL

    @staticmethod
    def query(str provider):
        """Return a FabricInfo for ``provider`` (e.g. "shm", "tcp;ofi_rxm"), or None
        if the provider is absent or cannot do what the engine needs."""
        cdef fi_info* hints = fi_allocinfo()
        cdef fi_info* found = NULL
        cdef int ret
        if hints == NULL:
            raise MemoryError("fi_allocinfo")
        try:
            hints.caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE
            hints.mode = FI_CONTEXT | FI_RX_CQ_DATA
            hints.ep_attr.type = FI_EP_RDM
            hints.domain_attr.mr_mode = MR_MODE_SUPPORTED
            hints.domain_attr.cq_data_size = CQ_DATA_BYTES
            hints.domain_attr.threading = FI_THREAD_DOMAIN
            hints.fabric_attr.prov_name = strdup(provider.encode())
            ret = fi_getinfo(FI_VERSION(API_VERSION[0], API_VERSION[1]), NULL, NULL, 0, hints, &found)
        finally:
            fi_freeinfo(hints)
        if ret != 0 or found == NULL:
            return None
        cdef fi_info* entry = found
        candidates = []
        while entry != NULL:
            candidates.append(describe_entry(entry))
            entry = entry.next
        try:
            chosen = choose_entry(candidates, os.environ)
        except BaseException:
            fi_freeinfo(found)
            raise
        if chosen is None:
            fi_freeinfo(found)
            return None
        entry = found
        for _ in range(chosen):
            entry = entry.next
        cdef FabricInfo self = FabricInfo.__new__(FabricInfo)
        # Keep the chosen entry only; the rest of the list is freed.
        self.info = fi_dupinfo(entry)
        fi_freeinfo(found)
        if self.info == NULL:
            raise MemoryError("fi_dupinfo")
        self.chosen = candidates[chosen]
        self.provider = self.info.fabric_attr.prov_name.decode()
        return self

    @property
    def mr_mode(self):
        return self.info.domain_attr.mr_mode

    @property
    def mr_mode_names(self):
        return sorted(n for n, bit in MR_MODE_BITS.items() if self.info.domain_attr.mr_mode & bit)

    @property
    def mr_key_size(self):
        return self.info.domain_attr.mr_key_size

    @property
    def fabric_name(self):
        return self.info.fabric_attr.name.decode() if self.info.fabric_attr.name != NULL else ""

    @property
    def domain_name(self):
        return self.info.domain_attr.name.decode() if self.info.domain_attr.name != NULL else ""

    @property
    def cq_data_size(self):
        return self.info.domain_attr.cq_data_size

    @property
    def inject_size(self):
        return self.info.tx_attr.inject_size

    @property
    def tx_size(self):
        return self.info.tx_attr.size

    @property
    def needs_rx_buffers_for_cq_data(self):
        return bool(self.info.mode & FI_RX_CQ_DATA)

    @property
    def manual_progress(self):
        return self.info.domain_attr.data_progress == FI_PROGRESS_MANUAL

    def __repr__(self):
        return (f"FabricInfo(provider={self.provider!r}, mr_mode={self.mr_mode_names}, "
                f"cq_data_size={self.cq_data_size}, inject_size={self.inject_size})")
