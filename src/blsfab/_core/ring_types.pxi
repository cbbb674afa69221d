# C structs and constants shared by the ring engine's classes.
#
# The engine is one class hierarchy, one file per protocol concern:
#   ring_state.pyx     RingState     resources, bookkeeping, errors, the broken state
#   ring_receive.pyx   RingReceiver  notifications, slot checks, delivery, spilling
#   ring_progress.pyx  RingProgress  CQ polling, the one wait primitive, credits, the thread
#   ring_send.pyx      RingSender    credit windows, slot packing, writes
#   engine.pyx         RingEngine    set-up, address blobs and the Python-facing calls

# Posts of fewer bytes than this keep the GIL until they have to wait.
cdef enum:
    NOGIL_BYTES = 65536

# Messages this large for an already posted iteration are read in place from
# the ring when the iteration completes, and such iterations are assembled
# into one buffer handed to the caller: one copy instead of three.
cdef enum:
    IN_PLACE_BYTES = 16384

# Receive states kept for reuse: a chain's worth (Communicator's MAX_CHAIN).
cdef enum:
    SPARE_STATES = 64

# Small received pieces are kept for reuse too, by size class: powers of two
# from 64 bytes (1 << PIECE_MIN_SHIFT) to 4 KiB, up to SPARE_PIECES of each.
cdef enum:
    PIECE_MIN_SHIFT = 6
    PIECE_CLASSES = 7
    SPARE_PIECES = 64

# Return codes of the nogil layer; RingState.error_for turns them into exceptions.
cdef enum:
    RC_OK = 0
    RC_TIMEOUT = -1
    RC_FABRIC = -2
    RC_PROTOCOL = -3
    RC_NOMEM = -4

# Protocol errors: what a peer did wrong. Every one names the peer and breaks
# the communicator, since our view of its ring can no longer be trusted.
cdef enum:
    PE_NOT_A_PEER = 1
    PE_OUTSIDE_WINDOW = 2
    PE_SLOT_TWICE = 3
    PE_BAD_HEADER = 4
    PE_ITERATION_ORDER = 5
    PE_ITERATION_WINDOW = 6
    PE_RECORD_OVERRUN = 7
    PE_CREDIT_UNSENT = 8
    PE_WANT_UNSENT = 9
    PE_RECORD_COUNT = 10
    PE_SPOOFED = 11
    PE_DATA_ON_SHARED = 12

PROTOCOL_ERRORS = {
    PE_NOT_A_PEER: "a notification names rank {rank}, which is not a peer",
    PE_OUTSIDE_WINDOW: "rank {rank} wrote a slot outside the credit window (sequence offset {value})",
    PE_SLOT_TWICE: "rank {rank} wrote the same slot twice before it was consumed",
    PE_BAD_HEADER: "slot from rank {rank} failed its header check (corrupt or misaddressed "
                   "write, seq {value})",
    PE_ITERATION_ORDER: "rank {rank} sent iteration {value} out of order",
    PE_ITERATION_WINDOW: "iteration {value} from rank {rank} does not fit the receive window; "
                         "a peer is further ahead than the bound allows",
    PE_RECORD_OVERRUN: "rank {rank} sent a record that overruns its slot (iteration {value})",
    PE_CREDIT_UNSENT: "rank {rank} reported consuming {value} slots, more than were sent to it",
    PE_WANT_UNSENT: "rank {rank} asked for a credit of {value} slots, beyond anything it sent",
    PE_RECORD_COUNT: "rank {rank} sent a slot claiming {value} records, more than fit a slot",
    PE_SPOOFED: "a notification naming rank {value} came from rank {rank}'s endpoint",
    PE_DATA_ON_SHARED: "rank {rank} announced a slot through the fabric, but it writes to this "
                       "rank through shared rings",
}

cdef struct Peer:
    fi_addr_t addr
    uint64_t ring_addr      # our ring in the peer's memory (virtual address or offset)
    uint64_t scratch_addr   # the ring's tail word: target of bare notifications
    uint64_t key            # the peer's key for our ring, and only ours
    uint64_t tx_seq         # slots written to the peer
    uint64_t tx_credit      # slots of ours the peer has consumed, as last told
    char* tx_stage          # staging slots, one per ring position; slot q's is
                            # reusable once the peer's credit passes q (it has
                            # the data, so the write no longer reads it)
    char* rx_ring           # the peer's ring in our memory
    uint64_t rx_processed   # slots whose records were delivered, in order
    uint64_t rx_consumed    # slots freed, in order (<= rx_processed): the credit
    uint32_t* rx_holds      # per ring position: records still read in place
    uint64_t rx_reported    # rx_consumed as last told to the peer
    uint64_t rx_wanted      # consumed count a blocked peer waits for (0: none)
    uint64_t* rx_landed     # per ring position: seq + 1 of a landed, unconsumed slot
    int64_t heard           # iterations received from the peer = its posts seen here
    bint greeted
    # Node-local path (node_local.py, shm.h): the peer is on this host, and
    # slots travel through shared rings instead of the fabric. Same slots,
    # same credits; a landed word replaces the CQ entry, a consumed word the
    # credit report. Bare notifications (greeting, WANT, credit answers) still
    # use the fabric.
    bint local
    bint notify_only        # planned for the node-local path: our fabric ring
                            # for it (and its for us) is only the notification word
    char* tx_shared         # our ring in the peer's segment: we pack slots there
    uint64_t* tx_published  # its landed words: we publish each slot with release
    uint64_t* tx_consumed   # its consumed word: the peer's credit, acquire
    uint64_t* rx_published  # landed words of the peer's ring in our segment
    uint64_t* rx_consumed_word  # where we publish rx_consumed

cdef struct TxContext:
    fi_context ctx          # libfabric's FI_CONTEXT storage for one write in flight

cdef struct IterState:
    int64_t iteration
    int nranks
    int arrived             # sources whose message is in, self included
    bint posted             # this rank has posted the iteration
    bint detached           # out of the engine's window: complete, or engine closed
    bint closed             # the engine closed before the iteration completed
    bint orphaned           # its Request is gone; whoever detaches it frees it
    size_t total
    size_t* nbytes
    char** data             # per source: its bytes (a piece, or in place in a ring)
    uint32_t* held          # per source: ring position + 1 if data is in place
    uint16_t* dtype         # per source: the element type its record header names
    uint8_t* have
    char* result            # assembled in rank order at completion (large iterations)
    int borrowed_src        # source whose data points into the caller's sendbuf (self), or -1
    char* out               # the caller's receive buffer (wait(out=)), or NULL
    size_t out_bytes
    bint filled_out         # assembled into ``out`` at completion
    IterState* next_held    # completed, still reading ring slots: the engine's list
    IterState* next_spare   # freed, kept for reuse: the engine's spare list
    int tx_pending          # zero-copy writes still reading the send buffer

cdef struct SendItem:
    const char* data
    size_t itemsize
    uint16_t dtype          # bls dtype code of the send buffer (wire.h)
    const int64_t* counts
    const int64_t* displs
    IterState* state

cdef struct Counters:
    uint64_t puts
    uint64_t injects
    uint64_t bytes_sent
    uint64_t bytes_received
    uint64_t blocked_posts
    uint64_t credits_sent
    uint64_t credit_requests
    uint64_t eagain
    uint64_t early_arrivals
    uint64_t in_place         # records read in place from a ring
    uint64_t spilled          # of those, copied out early for a blocked sender
    uint64_t zero_copy        # writes whose payload went straight from the send buffer
    int64_t max_lead
    uint64_t lead_sum
    uint64_t lead_samples


cdef inline size_t iter_state_bytes(int nranks) noexcept nogil:
    return sizeof(IterState) + nranks * (sizeof(size_t) + sizeof(char*) + sizeof(uint32_t)
                                         + sizeof(uint16_t) + sizeof(uint8_t))


cdef IterState* iter_state_new(int64_t iteration, int nranks) noexcept nogil:
    cdef IterState* st = <IterState*>malloc(iter_state_bytes(nranks))
    if st == NULL:
        return NULL
    iter_state_init(st, iteration, nranks)
    return st


cdef void iter_state_init(IterState* st, int64_t iteration, int nranks) noexcept nogil:
    """An empty receive state for ``iteration``, its arrays after the struct."""
    memset(st, 0, iter_state_bytes(nranks))
    st.iteration = iteration
    st.nranks = nranks
    st.borrowed_src = -1
    st.nbytes = <size_t*>(<char*>st + sizeof(IterState))
    st.data = <char**>(<char*>st.nbytes + nranks * sizeof(size_t))
    st.held = <uint32_t*>(<char*>st.data + nranks * sizeof(char*))
    st.dtype = <uint16_t*>(<char*>st.held + nranks * sizeof(uint32_t))
    st.have = <uint8_t*>(<char*>st.dtype + nranks * sizeof(uint16_t))


cdef inline int piece_class(size_t n) noexcept nogil:
    """The spare-piece size class of an ``n``-byte piece, or -1 if too large."""
    cdef int c = 0
    if n > (<size_t>1 << (PIECE_MIN_SHIFT + PIECE_CLASSES - 1)):
        return -1
    while (<size_t>1 << (PIECE_MIN_SHIFT + c)) < n:
        c += 1
    return c


cdef inline char* piece_alloc(size_t n) noexcept nogil:
    """A new piece for ``n`` bytes, sized to its whole class, so that it may
    later go to the spares and serve any record of that class."""
    cdef int c = piece_class(n)
    return <char*>malloc(n if c < 0 else <size_t>1 << (PIECE_MIN_SHIFT + c))


cdef void iter_state_free(IterState* st) noexcept nogil:
    """Free the state and what it owns: its pieces (never data held in a ring
    or borrowed from the send buffer) and any assembled result."""
    cdef int i
    for i in range(st.nranks):
        if not st.held[i] and i != st.borrowed_src:
            free(st.data[i])
    free(st.result)
    free(st)
