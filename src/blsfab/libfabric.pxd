# C declarations of the part of libfabric (API 1.17) that blsfab uses.
# Only the fields we read or set are declared; Cython takes the layout from the headers.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from posix.types cimport off_t


cdef extern from "<rdma/fabric.h>" nogil:
    ctypedef uint64_t fi_addr_t
    uint32_t FI_VERSION(int major, int minor)
    uint32_t FI_MAJOR(uint32_t version)
    uint32_t FI_MINOR(uint32_t version)

    # capability, operation and mode bits
    uint64_t FI_RMA, FI_WRITE, FI_REMOTE_WRITE, FI_MSG
    uint64_t FI_SEND, FI_RECV, FI_TRANSMIT
    uint64_t FI_REMOTE_CQ_DATA, FI_MORE, FI_COMPLETION, FI_INJECT
    uint64_t FI_CONTEXT, FI_RX_CQ_DATA, FI_LOCAL_COMM, FI_REMOTE_COMM
    uint64_t FI_SELECTIVE_COMPLETION, FI_SOURCE
    fi_addr_t FI_ADDR_NOTAVAIL
    int FI_MR_LOCAL, FI_MR_VIRT_ADDR, FI_MR_ALLOCATED, FI_MR_PROV_KEY
    int FI_MR_ENDPOINT, FI_MR_RAW
    uint32_t FI_ADDR_STR

    enum fi_ep_type:
        FI_EP_RDM
    enum fi_av_type:
        FI_AV_UNSPEC
        FI_AV_TABLE
    enum fi_progress:
        FI_PROGRESS_UNSPEC
        FI_PROGRESS_AUTO
        FI_PROGRESS_MANUAL
    enum fi_threading:
        FI_THREAD_UNSPEC
        FI_THREAD_SAFE
        FI_THREAD_DOMAIN
        FI_THREAD_COMPLETION

    struct fid:
        pass
    ctypedef fid* fid_t
    struct fid_fabric:
        fid fid
    struct fid_domain:
        fid fid
    struct fid_ep:
        fid fid
    struct fid_cq:
        fid fid
    struct fid_av:
        fid fid
    struct fid_mr:
        fid fid
        uint64_t key

    struct fi_context:
        void* internal[4]

    struct fi_tx_attr:
        uint64_t caps
        uint64_t mode
        uint64_t op_flags
        size_t inject_size
        size_t size
        size_t iov_limit
    struct fi_rx_attr:
        uint64_t caps
        uint64_t mode
        size_t size
    struct fi_ep_attr:
        fi_ep_type type
        uint32_t protocol
        size_t max_msg_size
    uint32_t FI_PROTO_RDMA_CM_IB_XRC
    enum fi_link_state:
        FI_LINK_UNKNOWN
        FI_LINK_DOWN
        FI_LINK_UP
    struct fi_device_attr:
        char* name
    struct fi_link_attr:
        char* address
        fi_link_state state
    struct fid_nic:
        fi_device_attr* device_attr
        fi_link_attr* link_attr
    struct fi_domain_attr:
        char* name
        fi_threading threading
        fi_progress control_progress
        fi_progress data_progress
        fi_av_type av_type
        int mr_mode
        size_t mr_key_size
        size_t cq_data_size
    struct fi_fabric_attr:
        char* name
        char* prov_name
        uint32_t prov_version
    struct fi_info:
        fi_info* next
        uint64_t caps
        uint64_t mode
        uint32_t addr_format
        size_t src_addrlen
        fi_tx_attr* tx_attr
        fi_rx_attr* rx_attr
        fi_ep_attr* ep_attr
        fi_domain_attr* domain_attr
        fi_fabric_attr* fabric_attr
        fid_nic* nic

    fi_info* fi_allocinfo()
    fi_info* fi_dupinfo(const fi_info* info)
    void fi_freeinfo(fi_info* info)
    int fi_getinfo(uint32_t version, const char* node, const char* service,
                   uint64_t flags, const fi_info* hints, fi_info** info)
    int fi_fabric(fi_fabric_attr* attr, fid_fabric** fabric, void* context)
    int fi_close(fid* fid)
    const char* fi_strerror(int errnum)
    uint32_t fi_version()


cdef extern from "<rdma/fi_errno.h>" nogil:
    int FI_EAGAIN, FI_EAVAIL, FI_ENODATA, FI_ETIMEDOUT, FI_ENOKEY


cdef extern from "<rdma/fi_domain.h>" nogil:
    struct fi_av_attr:
        fi_av_type type
        size_t count
    int fi_domain(fid_fabric* fabric, fi_info* info, fid_domain** domain, void* context)
    int fi_av_open(fid_domain* domain, fi_av_attr* attr, fid_av** av, void* context)
    int fi_av_insert(fid_av* av, const void* addr, size_t count, fi_addr_t* fi_addr,
                     uint64_t flags, void* context)
    int fi_mr_reg(fid_domain* domain, const void* buf, size_t len, uint64_t access,
                  uint64_t offset, uint64_t requested_key, uint64_t flags,
                  fid_mr** mr, void* context)
    void* fi_mr_desc(fid_mr* mr)
    uint64_t fi_mr_key(fid_mr* mr)
    int fi_mr_bind(fid_mr* mr, fid* bfid, uint64_t flags)
    int fi_mr_enable(fid_mr* mr)


cdef extern from "<rdma/fi_eq.h>" nogil:
    enum fi_cq_format:
        FI_CQ_FORMAT_DATA
    enum fi_wait_obj:
        FI_WAIT_NONE
    struct fi_cq_attr:
        size_t size
        uint64_t flags
        fi_cq_format format
        fi_wait_obj wait_obj
    struct fi_cq_data_entry:
        void* op_context
        uint64_t flags
        size_t len
        void* buf
        uint64_t data
    struct fi_cq_err_entry:
        void* op_context
        uint64_t flags
        size_t len
        uint64_t data
        int err
        int prov_errno
        void* err_data
        size_t err_data_size
    int fi_cq_open(fid_domain* domain, fi_cq_attr* attr, fid_cq** cq, void* context)
    ssize_t fi_cq_read(fid_cq* cq, void* buf, size_t count)
    ssize_t fi_cq_readfrom(fid_cq* cq, void* buf, size_t count, fi_addr_t* src_addr)
    ssize_t fi_cq_readerr(fid_cq* cq, fi_cq_err_entry* buf, uint64_t flags)
    const char* fi_cq_strerror(fid_cq* cq, int prov_errno, const void* err_data,
                               char* buf, size_t len)


cdef extern from "<rdma/fi_endpoint.h>" nogil:
    int fi_endpoint(fid_domain* domain, fi_info* info, fid_ep** ep, void* context)
    int fi_ep_bind(fid_ep* ep, fid* bfid, uint64_t flags)
    int fi_enable(fid_ep* ep)


cdef extern from "<rdma/fi_cm.h>" nogil:
    int fi_getname(fid* fid, void* addr, size_t* addrlen)
    int fi_setname(fid* fid, void* addr, size_t addrlen)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<rdma/fi_rma.h>" nogil:
    struct fi_rma_iov:
        uint64_t addr
        size_t len
        uint64_t key
    struct fi_msg_rma:
        const iovec* msg_iov
        void** desc
        size_t iov_count
        fi_addr_t addr
        const fi_rma_iov* rma_iov
        size_t rma_iov_count
        void* context
        uint64_t data
    ssize_t fi_writemsg(fid_ep* ep, const fi_msg_rma* msg, uint64_t flags)
    ssize_t fi_writedata(fid_ep* ep, const void* buf, size_t len, void* desc, uint64_t data,
                         fi_addr_t dest_addr, uint64_t addr, uint64_t key, void* context)
    ssize_t fi_inject_writedata(fid_ep* ep, const void* buf, size_t len, uint64_t data,
                                fi_addr_t dest_addr, uint64_t addr, uint64_t key)
