# RingEngine: one-sided writes into per-sender rings, with credits.
#
# Receive side. Rank d registers one region holding a ring of `ring_slots`
# slots for every other rank s. Rank s writes iteration messages into its ring
# on d with fi_writedata; the 32-bit CQ data names s and the slot sequence
# number. d processes each sender's slots in sequence order: it copies every
# record out into the per-iteration receive state (IterState) at once, whether
# or not d has posted that iteration yet, and frees the slot. So a slot is
# free as soon as its receiver has polled, and waiting is never the only thing
# that frees one.
#
# Credits. A sender may use slot sequence q only when q < credit + ring_slots,
# where credit counts the slots the receiver has consumed. The receiver
# reports its count in the header of every slot it writes back (every
# iteration writes to every peer). A sender that still finds its ring full
# sends a bare "want" notification; the receiver answers with a bare credit as
# soon as it has consumed enough. Steady state sends no bare credits at all.
# A slot is therefore never overwritten before its receiver copied it out, on
# any provider, including verbs where writes land without the target's CPU.
#
# All hot loops below run without the GIL and report failure through return
# codes; the Python-facing methods turn those into exceptions.

# Posts of fewer bytes than this keep the GIL.
cdef enum:
    NOGIL_BYTES = 65536

# Messages this large for an already posted iteration are read in place from
# the ring when the iteration completes, and such iterations are assembled
# into one buffer handed to the caller: one copy instead of three.
cdef enum:
    IN_PLACE_BYTES = 16384

cdef enum:
    RC_OK = 0
    RC_TIMEOUT = -1
    RC_FABRIC = -2
    RC_PROTOCOL = -3
    RC_NOMEM = -4

PROTOCOL_ERRORS = {
    1: "a notification names rank {rank}, which is not a peer",
    2: "rank {rank} wrote a slot outside the credit window (sequence offset {value})",
    3: "rank {rank} wrote the same slot twice before it was consumed",
    4: "slot from rank {rank} failed its header check (corrupt or misaddressed write, seq {value})",
    5: "rank {rank} sent iteration {value} out of order",
    6: "iteration {value} from rank {rank} does not fit the receive window; "
       "a peer is further ahead than the bound allows",
    7: "rank {rank} sent a record that overruns its slot",
}

cdef struct Peer:
    fi_addr_t addr
    uint64_t ring_addr      # our ring in the peer's region (virtual address or offset)
    uint64_t scratch_addr   # target of bare credit notifications
    uint64_t key
    uint64_t tx_seq         # slots written to the peer
    uint64_t tx_credit      # slots of ours the peer has consumed, as last told
    char* tx_stage          # staging slots, one per ring position; slot q's is
                            # reusable once the peer's credit passes q (it has
                            # the data, so the write no longer reads it)
    char* rx_ring           # the peer's ring in our region
    uint64_t rx_processed   # slots whose records were delivered, in order
    uint64_t rx_consumed    # slots freed, in order (<= rx_processed): the credit
    uint32_t* rx_holds      # per ring position: records still read in place
    uint64_t rx_reported    # rx_consumed as last told to the peer
    uint64_t rx_wanted      # consumed count a blocked peer waits for (0: none)
    uint64_t* rx_landed     # per ring position: seq + 1 of a landed, unconsumed slot
    int64_t heard           # iterations received from the peer = its posts seen here
    bint greeted

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
    uint8_t* have
    char* result            # assembled in rank order at completion (large iterations)
    int borrowed_src        # source whose data points into the caller's sendbuf (self), or -1
    char* out               # the caller's receive buffer (wait(out=)), or NULL
    size_t out_bytes
    bint filled_out         # assembled into ``out`` at completion

cdef struct SendItem:
    const char* data
    size_t itemsize
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
    int64_t max_lead
    uint64_t lead_sum
    uint64_t lead_samples


cdef IterState* iter_state_new(int64_t iteration, int nranks) noexcept nogil:
    cdef size_t arrays = nranks * (sizeof(size_t) + sizeof(char*) + sizeof(uint32_t)) + nranks
    cdef IterState* st = <IterState*>calloc(1, sizeof(IterState) + arrays)
    if st == NULL:
        return NULL
    st.iteration = iteration
    st.nranks = nranks
    st.borrowed_src = -1
    st.nbytes = <size_t*>(<char*>st + sizeof(IterState))
    st.data = <char**>(<char*>st.nbytes + nranks * sizeof(size_t))
    st.held = <uint32_t*>(<char*>st.data + nranks * sizeof(char*))
    st.have = <uint8_t*>(<char*>st.held + nranks * sizeof(uint32_t))
    return st


cdef void iter_state_free(IterState* st) noexcept nogil:
    """Free the state and its pieces (never data held in a ring)."""
    cdef int i
    for i in range(st.nranks):
        if not st.held[i] and i != st.borrowed_src:
            free(st.data[i])
    free(st.result)
    free(st)


cdef class RingEngine:
    """Registered rings, credits, nonblocking posts and progress for one rank.

    Policy (the bound, chaining, timeouts) belongs to the caller: the engine
    posts what it is given and waits as long as it is told.
    """

    cdef readonly int rank, size
    cdef readonly size_t slot_bytes
    cdef readonly int ring_slots
    cdef readonly str provider
    cdef readonly size_t inject_size
    cdef readonly size_t inject_limit  # largest slot sent with fi_inject_writedata
    cdef readonly bint selective       # writes need not generate local completions
    cdef readonly int64_t reserved     # iterations handed out to requests
    cdef readonly int64_t posted       # iterations posted
    cdef bint virt_addr
    cdef fid_ep* ep
    cdef fid_cq* cq
    cdef void* tx_desc
    cdef Peer* peers
    cdef TxContext* tx_ctx
    cdef IterState** window
    cdef int64_t window_mask
    cdef bint credits_due
    cdef Counters counters
    cdef uint32_t idle_polls
    # progress="thread": a thread polls between calls; every entry point then
    # holds this mutex, and the thread takes it for one poll at a time.
    cdef pthread_mutex_t mutex
    cdef readonly bint threaded
    cdef bint thread_stop
    cdef object thread
    cdef uint32_t spin_mask             # empty polls between yields, minus one
    cdef uint64_t scratch_word
    # last failure, filled without the GIL
    cdef int err_ret
    cdef const char* err_call
    cdef int err_rank
    cdef int err_kind
    cdef int64_t err_value
    cdef readonly bint closed
    cdef public double default_timeout
    cdef readonly FabricInfo info
    cdef Fabric fabric_obj
    cdef Domain domain_obj
    cdef CompletionQueue cq_obj
    cdef AddressVector av_obj
    cdef Endpoint ep_obj
    cdef RegisteredBuffer rx_region
    cdef RegisteredBuffer tx_region

    def __cinit__(self, FabricInfo info not None, int rank, int size, size_t slot_bytes,
                  int ring_slots, int window):
        self.peers = NULL
        self.tx_ctx = NULL
        self.window = NULL
        self.closed = True
        self.default_timeout = 60.0
        pthread_mutex_init(&self.mutex, NULL)
        self.spin_mask = 31
        if not (0 < size <= BLS_MAX_RANKS):
            raise ValueError(f"size={size}: blsfab supports 1 to {BLS_MAX_RANKS} ranks")
        if not (0 < ring_slots <= BLS_MAX_RING_SLOTS):
            raise ValueError(f"ring_slots={ring_slots} must be in 1..{BLS_MAX_RING_SLOTS}; "
                             "lower bound=")
        if slot_bytes < SLOT_OVERHEAD + 8 or slot_bytes % 8:
            raise ValueError(f"slot_bytes={slot_bytes} must be a multiple of 8 and at least "
                             f"{SLOT_OVERHEAD + 8}")
        if info.needs_rx_buffers_for_cq_data:
            raise FabricError(f"provider {info.provider!r} needs posted receive buffers for "
                              "remote CQ data (FI_RX_CQ_DATA), which blsfab does not post; "
                              "choose another provider", provider=info.provider)
        self.info = info
        self.provider = info.provider
        self.rank, self.size = rank, size
        self.slot_bytes = slot_bytes
        self.ring_slots = ring_slots
        self.inject_size = info.inject_size
        self.inject_limit = info.inject_size
        self.virt_addr = bool(info.mr_mode & FI_MR_VIRT_ADDR)
        wsize = 1
        while wsize < window:
            wsize <<= 1
        self.window_mask = wsize - 1
        self.window = <IterState**>calloc(wsize, sizeof(IterState*))
        self.peers = <Peer*>calloc(size, sizeof(Peer))
        self.tx_ctx = <TxContext*>calloc(size * ring_slots, sizeof(TxContext))
        if self.window == NULL or self.peers == NULL or self.tx_ctx == NULL:
            raise MemoryError("engine bookkeeping")

        self.fabric_obj = Fabric(info)
        self.domain_obj = Domain(self.fabric_obj)
        self.cq_obj = CompletionQueue(self.domain_obj, 0)
        self.av_obj = AddressVector(self.domain_obj, size)
        self.ep_obj = Endpoint(self.domain_obj, self.cq_obj, self.av_obj)
        self.ep, self.cq = self.ep_obj.ep, self.cq_obj.cq
        self.selective = self.ep_obj.selective_completion

        cdef size_t ring_bytes = <size_t>ring_slots * slot_bytes
        # Receive rings for every peer, then one scratch word for bare credits.
        self.rx_region = RegisteredBuffer(self.domain_obj, (size - 1) * ring_bytes + 64,
                                          FI_REMOTE_WRITE, 1, self.ep_obj)
        self.tx_region = RegisteredBuffer(self.domain_obj, (size - 1) * ring_bytes,
                                          FI_WRITE, 2, self.ep_obj)
        self.tx_desc = self.tx_region.desc
        cdef int r, i
        cdef Peer* p
        for r in range(size):
            if r == rank:
                continue
            p = &self.peers[r]
            i = r if r < rank else r - 1
            p.rx_ring = self.rx_region.base + i * ring_bytes
            p.tx_stage = self.tx_region.base + i * ring_bytes
            p.rx_landed = <uint64_t*>calloc(ring_slots, sizeof(uint64_t))
            p.rx_holds = <uint32_t*>calloc(ring_slots, sizeof(uint32_t))
            if p.rx_landed == NULL or p.rx_holds == NULL:
                raise MemoryError("engine bookkeeping")
        self.closed = False

    # ---- set-up -----------------------------------------------------------

    def local_address(self):
        """(endpoint name, receive region address, receive region key) for peers."""
        return (self.ep_obj.name(), self.rx_region.address, self.rx_region.key)

    def connect(self, list addresses):
        """Insert every rank's endpoint and compute where our rings sit on it."""
        cdef int r, i
        cdef Peer* p
        cdef size_t ring_bytes = <size_t>self.ring_slots * self.slot_bytes
        if len(addresses) != self.size:
            raise ValueError(f"connect needs {self.size} addresses, got {len(addresses)}")
        for r in range(self.size):
            name, base, key = addresses[r]
            if r == self.rank:
                continue
            p = &self.peers[r]
            self.av_obj.insert(name, &p.addr)
            i = self.rank if self.rank < r else self.rank - 1
            origin = base if self.virt_addr else 0
            p.ring_addr = origin + i * ring_bytes
            p.scratch_addr = origin + (self.size - 1) * ring_bytes
            p.key = key

    def greet(self, double timeout):
        """Warm every connection: one bare notification to each peer, then wait
        until every peer's has arrived. tcp;ofi_rxm connects on demand, so
        this takes the connection cost out of the first iteration."""
        cdef int r, rc = RC_OK
        cdef double deadline = monotonic() + timeout
        self._check_open()
        with nogil:
            for r in range(self.size):
                if r != self.rank:
                    rc = self.notify(r, bls_imm_encode(BLS_KIND_CREDIT, self.rank, 0), deadline)
                    if rc < 0:
                        break
                    rc = RC_OK
            if rc == RC_OK:
                rc = self.wait_greeted(deadline)
        if rc == RC_TIMEOUT:
            missing = [r for r in range(self.size) if r != self.rank and not self.peers[r].greeted]
            raise BlsTimeoutError(
                f"rank {self.rank}: connection warm-up heard nothing from ranks {missing} "
                f"within {timeout:g} s; are they running and using provider {self.provider!r}?",
                iteration=-1, ranks=missing)
        self._raise(rc)

    # ---- the hot path (no GIL) -------------------------------------------

    cdef int fail(self, int rc, int ret, const char* call, int rank, int kind,
                  int64_t value) noexcept nogil:
        self.err_ret, self.err_call, self.err_rank = ret, call, rank
        self.err_kind, self.err_value = kind, value
        return rc

    cdef int progress(self) noexcept nogil:
        """Reap up to one batch of completions, both directions. Returns the
        number handled (0 when idle) or a negative RC_ code."""
        cdef fi_cq_data_entry entries[16]
        cdef ssize_t n = fi_cq_read(self.cq, entries, 16)
        cdef ssize_t k
        cdef int rc
        if n == -FI_EAGAIN:
            return 0
        if n < 0:
            return self.fail(RC_FABRIC, <int>n, "fi_cq_read", -1, 0, 0)
        for k in range(n):
            # Classify by flags: shm may leave a non-NULL op_context on a remote
            # write's entry, and sockets flags the initiator's entry with
            # FI_REMOTE_CQ_DATA; only the target's carries FI_REMOTE_WRITE.
            # Our own writes' entries (providers without selective completion)
            # need nothing: credits, not completions, recycle staging slots.
            if entries[k].flags & FI_REMOTE_WRITE and entries[k].flags & FI_REMOTE_CQ_DATA:
                rc = self.on_notification(entries[k].data)
                if rc < 0:
                    return rc
        if self.credits_due:
            rc = self.return_credits()
            if rc < 0:
                return rc
        return <int>n

    cdef int on_notification(self, uint64_t imm) noexcept nogil:
        cdef uint32_t src = bls_imm_rank(imm)
        cdef Peer* p
        cdef int32_t delta
        cdef uint64_t seq
        cdef int rc
        if src >= <uint32_t>self.size or src == <uint32_t>self.rank:
            return self.fail(RC_PROTOCOL, 0, NULL, src, 1, 0)
        p = &self.peers[src]
        if bls_imm_kind(imm) == BLS_KIND_CREDIT:
            p.greeted = True
            if bls_imm_wants(imm):
                # The peer is blocked until we have consumed this many of its slots.
                delta = bls_imm_count_delta(imm, p.rx_reported)
                if delta > 0 and p.rx_reported + delta > p.rx_wanted:
                    p.rx_wanted = p.rx_reported + delta
                    self.credits_due = True
                    rc = self.spill(src)  # stop reading its slots in place
                    if rc < 0:
                        return rc
            else:
                delta = bls_imm_count_delta(imm, p.tx_credit)
                if delta > 0:
                    p.tx_credit += delta
            return RC_OK
        delta = bls_imm_count_delta(imm, p.rx_consumed)
        if delta < 0 or delta >= self.ring_slots:
            return self.fail(RC_PROTOCOL, 0, NULL, src, 2, delta)
        seq = p.rx_consumed + delta
        if p.rx_landed[seq % self.ring_slots] != 0:
            return self.fail(RC_PROTOCOL, 0, NULL, src, 3, <int64_t>seq)
        p.rx_landed[seq % self.ring_slots] = seq + 1
        # Slots are processed in sequence order, so iterations arrive in order.
        while p.rx_landed[p.rx_processed % self.ring_slots] == p.rx_processed + 1:
            rc = self.process_slot(src)
            if rc < 0:
                return rc
        self.release_slots(src)
        return RC_OK

    cdef void release_slots(self, int src) noexcept nogil:
        """Free processed slots, in order, once nothing reads them in place."""
        cdef Peer* p = &self.peers[src]
        cdef size_t pos
        while p.rx_consumed < p.rx_processed:
            pos = p.rx_consumed % self.ring_slots
            if p.rx_holds[pos]:
                break
            (<bls_slot_header_t*>(p.rx_ring + pos * self.slot_bytes)).magic = 0  # never stale
            p.rx_landed[pos] = 0
            p.rx_consumed += 1
            if p.rx_wanted:
                self.credits_due = True

    cdef int spill(self, int src) noexcept nogil:
        """Copy out every record of ``src`` still read in place, so its slots
        free now: the sender has asked for credit."""
        cdef int64_t i
        cdef IterState* st
        cdef char* piece
        cdef Peer* p = &self.peers[src]
        for i in range(self.window_mask + 1):
            st = self.window[i]
            if st == NULL or not st.held[src]:
                continue
            piece = <char*>malloc(st.nbytes[src])
            if piece == NULL:
                return self.fail(RC_NOMEM, 0, NULL, src, 0, st.iteration)
            memcpy(piece, st.data[src], st.nbytes[src])
            p.rx_holds[st.held[src] - 1] -= 1
            st.held[src] = 0
            st.data[src] = piece
            self.counters.spilled += 1
        self.release_slots(src)
        return RC_OK

    cdef int process_slot(self, int src) noexcept nogil:
        cdef Peer* p = &self.peers[src]
        cdef size_t pos = p.rx_processed % self.ring_slots
        cdef char* slot = p.rx_ring + pos * self.slot_bytes
        cdef bls_slot_header_t* hdr = <bls_slot_header_t*>slot
        cdef size_t off = sizeof(bls_slot_header_t)
        cdef size_t n
        cdef uint32_t k
        cdef int64_t it
        cdef IterState* st
        cdef int rc
        if hdr.magic != BLS_SLOT_MAGIC or hdr.seq != p.rx_processed:
            return self.fail(RC_PROTOCOL, 0, NULL, src, 4, <int64_t>p.rx_processed)
        if hdr.credit > p.tx_credit:
            p.tx_credit = hdr.credit
        for k in range(hdr.nrecords):
            it = <int64_t>hdr.first_iteration + k
            if it != p.heard:
                return self.fail(RC_PROTOCOL, 0, NULL, src, 5, it)
            if off + sizeof(bls_record_header_t) > self.slot_bytes:
                return self.fail(RC_PROTOCOL, 0, NULL, src, 7, it)
            n = (<bls_record_header_t*>(slot + off)).nbytes
            off += sizeof(bls_record_header_t)
            if n > self.slot_bytes or off + bls_align(n) > self.slot_bytes:
                return self.fail(RC_PROTOCOL, 0, NULL, src, 7, it)
            rc = self.state_for(it, &st)
            if rc < 0:
                return rc
            if st.posted and n >= IN_PLACE_BYTES:
                # Large and awaited: read it in place when the iteration
                # completes, one copy from ring to result.
                st.held[src] = pos + 1
                p.rx_holds[pos] += 1
                self.counters.in_place += 1
            rc = self.deliver(st, src, slot + off, n)
            if rc < 0:
                return rc
            self.counters.bytes_received += n
            p.heard = it + 1
            off += bls_align(n)
        p.rx_processed += 1
        return RC_OK

    cdef int state_for(self, int64_t it, IterState** out) noexcept nogil:
        """The receive state of iteration ``it``, created on first touch."""
        cdef IterState* st = self.window[it & self.window_mask]
        if st == NULL:
            st = iter_state_new(it, self.size)
            if st == NULL:
                return self.fail(RC_NOMEM, 0, NULL, -1, 0, it)
            self.window[it & self.window_mask] = st
        elif st.iteration != it:
            return self.fail(RC_PROTOCOL, 0, NULL, -1, 6, it)
        out[0] = st
        return RC_OK

    cdef int deliver(self, IterState* st, int src, const char* payload, size_t n) noexcept nogil:
        """Record ``src``'s message: in place if marked held, else as a copy."""
        if st.have[src]:
            return self.fail(RC_PROTOCOL, 0, NULL, src, 5, st.iteration)
        if st.held[src] or src == st.borrowed_src:
            st.data[src] = <char*>payload
        elif n:
            st.data[src] = <char*>malloc(n)
            if st.data[src] == NULL:
                return self.fail(RC_NOMEM, 0, NULL, src, 0, st.iteration)
            memcpy(st.data[src], payload, n)
        st.nbytes[src] = n
        st.have[src] = 1
        st.total += n
        st.arrived += 1
        if not st.posted:
            self.counters.early_arrivals += 1
        elif st.arrived == st.nranks:
            return self.complete(st)
        return RC_OK

    cdef int complete(self, IterState* st) noexcept nogil:
        """All messages are in: assemble into the caller's buffer if wait(out=)
        gave one that fits, else assemble large iterations into a new one
        (freeing the ring slots read in place); hand the state to its Request."""
        cdef int s
        cdef size_t offset = 0
        cdef bint in_place = False
        cdef char* dest
        for s in range(st.nranks):
            in_place = in_place or st.held[s] != 0
        if st.out != NULL and st.out_bytes == st.total:
            dest = st.out
            st.filled_out = True
        elif in_place or st.total >= IN_PLACE_BYTES:
            st.result = <char*>malloc(st.total if st.total else 1)
            if st.result == NULL:
                return self.fail(RC_NOMEM, 0, NULL, -1, 0, st.iteration)
            dest = st.result
        else:
            dest = NULL  # small: the Request assembles it
        if dest != NULL:
            for s in range(st.nranks):
                if st.nbytes[s]:
                    memcpy(dest + offset, st.data[s], st.nbytes[s])
                    offset += st.nbytes[s]
                if st.held[s]:
                    self.peers[s].rx_holds[st.held[s] - 1] -= 1
                    st.held[s] = 0
                    self.release_slots(s)
                elif s != st.borrowed_src:
                    free(st.data[s])
                st.data[s] = NULL
            st.borrowed_src = -1
        st.out = NULL
        self.window[st.iteration & self.window_mask] = NULL
        st.detached = True
        if st.orphaned:
            iter_state_free(st)
        return RC_OK

    cdef int notify(self, int dst, uint32_t imm, double deadline) noexcept nogil:
        """A bare notification (no payload) to ``dst``. With a negative
        deadline it is opportunistic: a full provider queue returns RC_OK and
        leaves the caller's state unchanged. Returns 1 once sent."""
        cdef Peer* p = &self.peers[dst]
        cdef ssize_t ret
        cdef int n
        while True:
            ret = fi_inject_writedata(self.ep, &self.scratch_word, sizeof(uint64_t), imm,
                                      p.addr, p.scratch_addr, p.key)
            if ret == 0:
                return 1
            if ret != -FI_EAGAIN:
                return self.fail(RC_FABRIC, <int>ret, "fi_inject_writedata", dst, 0, 0)
            self.counters.eagain += 1
            if deadline < 0:
                return RC_OK
            n = self.progress()
            if n < 0:
                return n
            if n == 0 and self.idle(deadline, dst) < 0:
                return RC_TIMEOUT

    cdef int return_credits(self) noexcept nogil:
        """Answer peers blocked on credits (they asked with BLS_IMM_WANT) once
        we have consumed what they wait for. Ordinary credits ride in slot
        headers, so in steady state this sends nothing."""
        cdef int r, rc
        cdef Peer* p
        self.credits_due = False
        for r in range(self.size):
            p = &self.peers[r]
            if r == self.rank or p.rx_wanted == 0:
                continue
            if p.rx_reported < p.rx_wanted <= p.rx_consumed:
                rc = self.notify(r, bls_imm_encode(BLS_KIND_CREDIT, self.rank, p.rx_consumed), -1.0)
                if rc < 0:
                    return rc
                if rc == 0:
                    self.credits_due = True  # provider queue full; retry at next progress
                    continue
                p.rx_reported = p.rx_consumed
                self.counters.credits_sent += 1
            if p.rx_reported >= p.rx_wanted:
                p.rx_wanted = 0
        return RC_OK

    cdef int idle(self, double deadline, int rank) noexcept nogil:
        """Called when a poll found nothing. Spin briefly (a reply is often
        microseconds away), then give the core away, so oversubscribed ranks
        do not starve each other; read the clock only now and then, as it may
        be a system call in a VM."""
        self.idle_polls += 1
        if self.idle_polls & self.spin_mask:
            return RC_OK
        if monotonic() > deadline:
            return self.fail(RC_TIMEOUT, 0, NULL, rank, 0, 0)
        sched_yield()
        return RC_OK

    cdef int acquire_slot(self, int dst, double deadline) noexcept nogil:
        """Wait, progressing, until slot ``tx_seq`` towards ``dst`` is free:
        the peer has consumed what was last written there."""
        cdef Peer* p = &self.peers[dst]
        cdef uint64_t seq = p.tx_seq
        cdef int n
        if seq < p.tx_credit + self.ring_slots:
            return RC_OK
        self.counters.blocked_posts += 1
        n = self.notify(dst, bls_imm_encode(BLS_KIND_CREDIT, self.rank,
                                            seq - self.ring_slots + 1) | BLS_IMM_WANT, deadline)
        if n < 0:
            return n
        self.counters.credit_requests += 1
        while True:
            n = self.progress()
            if n < 0:
                return n
            if seq < p.tx_credit + self.ring_slots:
                return RC_OK
            if n == 0 and self.idle(deadline, dst) < 0:
                return RC_TIMEOUT

    cdef int write_slot(self, int dst, size_t length, bint more, double deadline) noexcept nogil:
        """Write staging slot ``tx_seq`` to ``dst``; data and notification
        travel in one operation. Small slots are injected (no completion at
        all); others go unsignalled where the provider allows, with FI_MORE
        while more writes of the same post follow."""
        cdef Peer* p = &self.peers[dst]
        cdef uint64_t seq = p.tx_seq
        cdef size_t pos = seq % self.ring_slots
        cdef char* buf = p.tx_stage + pos * self.slot_bytes
        cdef uint32_t imm = bls_imm_encode(BLS_KIND_DATA, self.rank, seq)
        cdef bint inject = length <= self.inject_limit
        cdef iovec iov
        cdef fi_rma_iov rma
        cdef fi_msg_rma msg
        cdef uint64_t flags = FI_REMOTE_CQ_DATA
        cdef ssize_t ret
        cdef int n
        if not inject:
            iov.iov_base, iov.iov_len = buf, length
            rma.addr, rma.len, rma.key = p.ring_addr + pos * self.slot_bytes, length, p.key
            msg.msg_iov, msg.desc, msg.iov_count = &iov, &self.tx_desc, 1
            msg.addr, msg.rma_iov, msg.rma_iov_count = p.addr, &rma, 1
            msg.context = &self.tx_ctx[dst * self.ring_slots + pos].ctx
            msg.data = imm
            if more:
                flags |= FI_MORE
            if not self.selective:
                flags |= FI_COMPLETION
        while True:
            if inject:
                ret = fi_inject_writedata(self.ep, buf, length, imm, p.addr,
                                          p.ring_addr + pos * self.slot_bytes, p.key)
            else:
                ret = fi_writemsg(self.ep, &msg, flags)
            if ret == 0:
                break
            if ret != -FI_EAGAIN:
                return self.fail(RC_FABRIC, <int>ret, "fi_writedata", dst, 0, 0)
            # Provider queue full, or tcp still connecting: progress and retry.
            self.counters.eagain += 1
            n = self.progress()
            if n < 0:
                return n
            if n == 0 and self.idle(deadline, dst) < 0:
                return RC_TIMEOUT
        if inject:
            self.counters.injects += 1
        self.counters.puts += 1
        p.tx_seq = seq + 1
        return RC_OK

    cdef int post_items(self, SendItem* items, int m, double deadline) noexcept nogil:
        """Post ``m`` consecutive iterations: per peer, pack as many records as
        fit into each slot, so a chain travels as one write per peer."""
        cdef int k, j, dst, rc
        cdef size_t off, n, need
        cdef char* stage
        cdef bls_slot_header_t* hdr
        cdef Peer* p
        for k in range(m):
            items[k].state.posted = True
            # The self part stays in the sendbuf until the result is assembled:
            # one copy, straight into the result (the MPI send-buffer rule).
            items[k].state.borrowed_src = self.rank
            n = items[k].counts[self.rank] * items[k].itemsize
            rc = self.deliver(items[k].state, self.rank,
                              items[k].data + items[k].displs[self.rank] * items[k].itemsize, n)
            if rc < 0:
                return rc
        for j in range(1, self.size):
            dst = (self.rank + j) % self.size  # stagger targets to avoid hot spots
            p = &self.peers[dst]
            k = 0
            while k < m:
                rc = self.acquire_slot(dst, deadline)
                if rc < 0:
                    return rc
                stage = p.tx_stage + (p.tx_seq % self.ring_slots) * self.slot_bytes
                hdr = <bls_slot_header_t*>stage
                hdr.seq = p.tx_seq
                hdr.first_iteration = <uint64_t>items[k].state.iteration
                hdr.nrecords = 0
                hdr.magic = BLS_SLOT_MAGIC
                off = sizeof(bls_slot_header_t)
                while k < m:
                    n = items[k].counts[dst] * items[k].itemsize
                    need = sizeof(bls_record_header_t) + bls_align(n)
                    if off + need > self.slot_bytes and hdr.nrecords > 0:
                        break  # next record starts the next slot
                    (<bls_record_header_t*>(stage + off)).nbytes = n
                    memcpy(stage + off + sizeof(bls_record_header_t),
                           items[k].data + items[k].displs[dst] * items[k].itemsize, n)
                    off += need
                    hdr.nrecords += 1
                    self.counters.bytes_sent += n
                    k += 1
                hdr.credit = p.rx_consumed  # piggy-backed credit
                p.rx_reported = p.rx_consumed
                # FI_MORE only while more slots for this same peer follow: a
                # provider that batches per connection flushes at the last one.
                rc = self.write_slot(dst, off, k < m, deadline)
                if rc < 0:
                    return rc
        self.posted += m
        return RC_OK

    cdef int64_t min_heard(self) noexcept nogil:
        cdef int64_t low = self.posted
        cdef int r
        for r in range(self.size):
            if r != self.rank and self.peers[r].heard < low:
                low = self.peers[r].heard
        return low

    cdef int wait_heard_nogil(self, int64_t need, double deadline) noexcept nogil:
        cdef int n
        while self.min_heard() < need:
            n = self.progress()
            if n < 0:
                return n
            if n == 0 and self.idle(deadline, -1) < 0:
                return RC_TIMEOUT
        return RC_OK

    cdef int wait_state(self, IterState* st, double deadline) noexcept nogil:
        cdef int n
        while not st.detached:
            n = self.progress()
            if n < 0:
                return n
            if n == 0 and self.idle(deadline, -1) < 0:
                return RC_TIMEOUT
        return RC_OK

    cdef int wait_greeted(self, double deadline) noexcept nogil:
        cdef int r, n
        r = 0
        while r < self.size:
            if r == self.rank or self.peers[r].greeted:
                r += 1
                continue
            n = self.progress()
            if n < 0:
                return n
            if n == 0 and self.idle(deadline, r) < 0:
                return RC_TIMEOUT
        return RC_OK

    # ---- Python-facing ----------------------------------------------------

    cdef int _check_open(self) except -1:
        if self.closed:
            raise ClosedError("this communicator is closed; create a new blsfab.Communicator")
        return 0

    cdef int _raise(self, int rc, int64_t iteration=-1, str waiting_for="") except -1:
        """Turn an RC_ code into the matching exception (no-op for RC_OK)."""
        if rc >= RC_OK:
            return 0
        if rc == RC_TIMEOUT:
            ranks = [self.err_rank] if self.err_rank >= 0 else []
            raise BlsTimeoutError(f"rank {self.rank}: timed out {waiting_for or 'waiting'} "
                                  f"for ranks {ranks}", iteration=iteration, ranks=ranks)
        if rc == RC_FABRIC:
            if self.err_ret == -FI_EAVAIL:
                detail = self.cq_obj.read_error()
            else:
                detail = fi_error_text(self.err_ret)
            call = self.err_call.decode() if self.err_call != NULL else "libfabric"
            peer = f" towards rank {self.err_rank}" if self.err_rank >= 0 else ""
            raise FabricError(f"rank {self.rank}: {call}{peer} failed on provider "
                              f"{self.provider!r}: {detail}", provider=self.provider,
                              errno=-self.err_ret, strerror=detail)
        if rc == RC_NOMEM:
            raise MemoryError(f"rank {self.rank}: out of memory receiving iteration {self.err_value}")
        text = PROTOCOL_ERRORS.get(self.err_kind, "protocol error").format(
            rank=self.err_rank, value=self.err_value)
        raise FabricError(f"rank {self.rank}: {text} (provider {self.provider!r}); data "
                          "integrity cannot be guaranteed, close this communicator",
                          provider=self.provider)

    cdef inline void lock(self) noexcept nogil:
        if self.threaded:
            pthread_mutex_lock(&self.mutex)

    cdef inline void unlock(self) noexcept nogil:
        if self.threaded:
            pthread_mutex_unlock(&self.mutex)

    def make_progress(self):
        """Poll the completion queue once. Returns the number of completions."""
        self._check_open()
        cdef int n
        self.lock()
        n = self.progress()
        self.unlock()
        self._raise(n)
        return max(n, 0)

    def start_progress_thread(self):
        """Poll from a background thread (without the GIL) between calls, so
        data lands and credits flow while the caller computes."""
        import threading
        self._check_open()
        if self.threaded:
            return
        self.threaded = True
        self.thread_stop = False
        self.thread = threading.Thread(target=self._progress_loop, name="blsfab-progress",
                                       daemon=True)
        self.thread.start()

    def _progress_loop(self):
        cdef int n = 0
        cdef timespec pause
        pause.tv_sec, pause.tv_nsec = 0, 20000
        with nogil:
            while True:
                pthread_mutex_lock(&self.mutex)
                if self.thread_stop:
                    pthread_mutex_unlock(&self.mutex)
                    break
                n = self.progress()
                pthread_mutex_unlock(&self.mutex)
                if n < 0:
                    break  # the error is kept; the next call on the engine reports it
                if n == 0:
                    nanosleep(&pause, NULL)

    def stop_progress_thread(self):
        if not self.threaded:
            return
        pthread_mutex_lock(&self.mutex)
        self.thread_stop = True
        pthread_mutex_unlock(&self.mutex)
        self.thread.join()
        self.thread = None
        self.threaded = False

    def post(self, list requests not None, double timeout, int64_t bound=-1):
        """Post prepared Requests as consecutive iterations, packed per peer;
        with ``bound`` >= 0, then wait until every peer has posted the last of
        them minus ``bound``."""
        cdef int m = len(requests)
        cdef int k, rc
        cdef SendItem* items
        cdef Request req
        cdef double deadline = monotonic() + timeout
        self._check_open()
        if m == 0:
            return
        items = <SendItem*>malloc(m * sizeof(SendItem))
        if items == NULL:
            raise MemoryError()
        try:
            for k in range(m):
                req = <Request>requests[k]
                if req.state == NULL or req.state.iteration != self.posted + k:
                    raise RuntimeError(f"request for iteration {req.iteration} posted out of "
                                       f"order; next iteration to post is {self.posted + k}")
                items[k] = req.item
            with nogil:
                self.lock()
                rc = self.post_items(items, m, deadline)
                self.unlock()
            self._raise(rc, requests[0].iteration, "posting")
        finally:
            free(items)
            for k in range(m):
                (<Request>requests[k]).release_send()
        if bound >= 0:
            self._await_heard(self.posted - bound, deadline, timeout)

    def wait_heard(self, int64_t need, double timeout):
        """Block, progressing, until every peer has posted ``need`` iterations.
        Returns the lead: iterations posted here beyond the slowest peer."""
        self._check_open()
        return self._await_heard(need, monotonic() + timeout, timeout)

    cdef int64_t _await_heard(self, int64_t need, double deadline, double timeout) except? -1:
        """The bounded-lag wait; returns the lead it leaves."""
        cdef int rc
        if self.min_heard() < need:
            with nogil:
                self.lock()
                rc = self.wait_heard_nogil(need, deadline)
                self.unlock()
            self._raise_bound(rc, need, timeout)
        return self.note_lead()


    def ialltoallv(self, object sendbuf, object sendcounts, int64_t bound, double timeout):
        """The unchained fast path in one call: validate, post, then wait until
        every peer has posted this iteration minus ``bound``."""
        cdef Request req
        cdef int rc
        cdef double deadline
        self._check_open()
        req = Request._create(self, sendbuf, sendcounts)
        deadline = monotonic() + timeout
        # Keep the GIL for short work: releasing it costs more than a small post.
        if req.send_bytes < NOGIL_BYTES and not self.threaded:
            rc = self.post_items(&req.item, 1, deadline)
        else:
            with nogil:
                self.lock()
                rc = self.post_items(&req.item, 1, deadline)
                self.unlock()
        req.release_send()
        self._raise(rc, req.iteration, "posting")
        self._await_heard(req.iteration + 1 - bound, deadline, timeout)
        return req

    cdef int _raise_bound(self, int rc, int64_t need, double timeout) except -1:
        if rc == RC_TIMEOUT:
            late = self.ranks_behind(need)
            raise BlsTimeoutError(
                f"rank {self.rank}: iteration {self.posted - 1} waited {timeout:g} s for ranks "
                f"{late} to post iteration {need - 1} (the bound); they are stopped, crashed or "
                "far slower; raise timeout= if they are merely slow",
                iteration=self.posted - 1, ranks=late)
        return self._raise(rc, self.posted - 1)

    cdef int64_t note_lead(self):
        cdef int64_t lead = self.posted - self.min_heard()
        if lead > self.counters.max_lead:
            self.counters.max_lead = lead
        self.counters.lead_sum += lead
        self.counters.lead_samples += 1
        return lead

    def ranks_behind(self, int64_t need):
        """Ranks from which fewer than ``need`` iterations have arrived."""
        return [r for r in range(self.size) if r != self.rank and self.peers[r].heard < need]

    def heard(self):
        """Iterations received from each rank (this rank: iterations posted)."""
        return [self.peers[r].heard if r != self.rank else self.posted for r in range(self.size)]

    def set_spin_polls(self, uint32_t polls):
        """Empty polls before a wait yields the core (rounded up to a power of
        two). Few when ranks outnumber cores, so they do not starve each
        other; many otherwise, since a reply is often microseconds away."""
        cdef uint32_t p = 1
        while p < polls:
            p <<= 1
        self.spin_mask = p - 1

    def set_inject_limit(self, size_t limit):
        """Slots up to ``limit`` bytes (capped at the provider's inject size)
        go out with fi_inject_writedata."""
        self.inject_limit = min(limit, self.inject_size)

    def counters_dict(self):
        c = self.counters
        return {
            "puts": c.puts, "injects": c.injects, "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received, "blocked_posts": c.blocked_posts,
            "credits_sent": c.credits_sent, "credit_requests": c.credit_requests, "eagain_retries": c.eagain,
            "early_arrivals": c.early_arrivals, "in_place": c.in_place,
            "spilled": c.spilled, "max_lead": c.max_lead,
            "mean_lead": (<double>c.lead_sum / c.lead_samples) if c.lead_samples else 0.0,
            "ring_bytes": self.rx_region.nbytes if self.rx_region is not None else 0,
            "staging_bytes": self.tx_region.nbytes if self.tx_region is not None else 0,
            "ring_slots": self.ring_slots, "slot_bytes": self.slot_bytes,
            "inject_limit": self.inject_limit, "selective_completion": self.selective,
        }

    def close(self):
        """Release every libfabric resource. Pending receive states are handed
        to their Requests (which then report the closed communicator) or freed."""
        cdef int64_t i
        cdef IterState* st
        if self.closed:
            return
        self.stop_progress_thread()
        self.closed = True
        if self.window != NULL:
            for i in range(self.window_mask + 1):
                st = self.window[i]
                if st == NULL:
                    continue
                self.window[i] = NULL
                st.detached = True
                st.closed = True
                # Reserved iterations belong to their Request, which frees them.
                if st.orphaned or st.iteration >= self.reserved:
                    iter_state_free(st)
        for obj in (self.ep_obj, self.rx_region, self.tx_region, self.av_obj, self.cq_obj,
                    self.domain_obj, self.fabric_obj):
            if obj is not None:
                obj.close()

    def __dealloc__(self):
        cdef int r
        self.close()
        if self.peers != NULL:
            for r in range(self.size):
                free(self.peers[r].rx_landed)
                free(self.peers[r].rx_holds)
            free(self.peers)
        free(self.tx_ctx)
        free(self.window)
        pthread_mutex_destroy(&self.mutex)

    # ---- requests -----------------------------------------------------------

    def prepare(self, object sendbuf, object sendcounts):
        """Validate one iteration's arguments and reserve its iteration number.
        Nothing is sent: pass the Request to post()."""
        self._check_open()
        return Request._create(self, sendbuf, sendcounts)


def imm_encode(uint32_t kind, uint32_t rank, uint64_t count):
    """The 32-bit remote CQ data for a notification (see include/blsfab/wire.h)."""
    return bls_imm_encode(kind, rank, count)


def imm_decode(uint32_t imm, uint64_t floor):
    """(kind, rank, count) of ``imm``, rebuilding the count from ``floor``."""
    return (bls_imm_kind(imm), bls_imm_rank(imm), floor + bls_imm_count_delta(imm, floor))
