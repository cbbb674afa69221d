# RingEngine: set-up (resources, address blobs, connection warm-up) and the
# Python-facing calls. The protocol itself is in ring_receive.pyx (what
# arrives), ring_progress.pyx (polling, waiting, credits) and ring_send.pyx
# (what leaves); ring_state.pyx turns failures into exceptions.


cdef uint64_t random_key(size_t key_bytes):
    """An unpredictable memory-region key of ``key_bytes`` bytes (at most 8), never 0."""
    cdef uint64_t key = 0
    cdef size_t n = key_bytes if 0 < key_bytes < 8 else 8
    while key == 0:
        key = int.from_bytes(os.urandom(n), "little")
    return key


cdef RegisteredBuffer register_with_random_key(Domain domain, size_t nbytes, uint64_t access,
                                               Endpoint endpoint):
    """Register ``nbytes`` under a fresh random key; a key already taken in the
    domain (FI_ENOKEY) is drawn again."""
    cdef int attempt
    for attempt in range(16):
        try:
            return RegisteredBuffer(domain, nbytes, access,
                                    random_key(domain.fabric.info.info.domain_attr.mr_key_size),
                                    endpoint)
        except FabricError as exc:
            if exc.errno != FI_ENOKEY or attempt == 15:
                raise


cdef class RingEngine(RingSender):
    """Registered rings, credits, nonblocking posts and progress for one rank.

    Policy (the bound, chaining, timeouts) belongs to the caller: the engine
    posts what it is given and waits as long as it is told.
    """

    cdef size_t ring_bytes              # one ring region: slots, then the tail word
    cdef Fabric fabric_obj
    cdef Domain domain_obj
    cdef CompletionQueue cq_obj
    cdef AddressVector av_obj
    cdef Endpoint ep_obj
    cdef list rx_regions                # per sender rank: its ring, its own key
    cdef object shared_rings            # node_local.NodeLocalRings, while in use
    cdef RegisteredBuffer tx_region     # staging, for fabric peers only
    cdef bint memory_registered

    def __cinit__(self, FabricInfo info not None, int rank, int size, size_t slot_bytes,
                  int ring_slots, int window, str region_name=None):
        if not (0 < size <= BLS_MAX_RANKS):
            raise ValueError(f"size={size}: blsfab supports 1 to {BLS_MAX_RANKS} ranks")
        if not (0 <= rank < size):
            raise ValueError(f"rank={rank} must be in 0..{size - 1}")
        if not (0 < ring_slots <= BLS_MAX_RING_SLOTS):
            raise ValueError(f"ring_slots={ring_slots} must be in 1..{BLS_MAX_RING_SLOTS}; "
                             "lower bound=")
        if slot_bytes < SLOT_OVERHEAD + 8 or slot_bytes % 8 or slot_bytes > (1 << 40):
            raise ValueError(f"slot_bytes={slot_bytes} must be a multiple of 8 between "
                             f"{SLOT_OVERHEAD + 8} and 2**40")
        if info.needs_rx_buffers_for_cq_data:
            raise FabricError(f"provider {info.provider!r} needs posted receive buffers for "
                              "remote CQ data (FI_RX_CQ_DATA), which blsfab does not post; "
                              "choose another provider", provider=info.provider)
        self.info = info
        self.provider = info.provider
        self.rank, self.size = rank, size
        self.slot_bytes = slot_bytes
        self.ring_slots = ring_slots
        self.ring_bytes = <size_t>ring_slots * slot_bytes + 64
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
        self.tx_zero_copy = <IterState**>calloc(size * ring_slots, sizeof(IterState*))
        self.zero_copy_ctx = <TxContext*>calloc(size * ring_slots, sizeof(TxContext))
        if self.tx_zero_copy == NULL or self.zero_copy_ctx == NULL:
            raise MemoryError("engine bookkeeping")
        if self.window == NULL or self.peers == NULL or self.tx_ctx == NULL:
            raise MemoryError("engine bookkeeping")

        self.fabric_obj = Fabric(info)
        self.domain_obj = Domain(self.fabric_obj)
        self.cq_obj = CompletionQueue(self.domain_obj, 0)
        self.av_obj = AddressVector(self.domain_obj, size)
        self.ep_obj = Endpoint(self.domain_obj, self.cq_obj, self.av_obj, region_name)
        self.ep, self.cq = self.ep_obj.ep, self.cq_obj.cq
        self.selective = self.ep_obj.selective_completion
        self.check_source = info.source_addresses

        cdef int r
        cdef Peer* p
        for r in range(size):
            if r == rank:
                continue
            p = &self.peers[r]
            p.rx_landed = <uint64_t*>calloc(ring_slots, sizeof(uint64_t))
            p.rx_holds = <uint32_t*>calloc(ring_slots, sizeof(uint32_t))
            if p.rx_landed == NULL or p.rx_holds == NULL:
                raise MemoryError("engine bookkeeping")
        # Rings and staging are registered by local_address(), once
        # set_zero_copy() and plan_shared_rings() have said how large.
        self.rx_regions = [None] * size
        self.stage_slot_bytes = slot_bytes
        self.closed = False

    cdef int register_memory(self) except -1:
        """Register one region per sender ring, each under its own random key
        that only that sender learns (a peer can address no ring but its
        own), and the staging slots. A shared-ring peer's fabric ring only
        ever receives bare notifications, so it is just the notification
        word, and it needs no staging."""
        cdef int r, i = 0
        cdef Peer* p
        cdef RegisteredBuffer ring
        cdef int fabric_peers = 0
        cdef size_t stage_bytes = <size_t>self.ring_slots * self.stage_slot_bytes
        if self.memory_registered:
            return 0
        for r in range(self.size):
            if r != self.rank and not self.peers[r].notify_only:
                fabric_peers += 1
        if fabric_peers:
            self.tx_region = register_with_random_key(self.domain_obj, fabric_peers * stage_bytes,
                                                      FI_WRITE, self.ep_obj)
            self.tx_desc = self.tx_region.desc
        for r in range(self.size):
            if r == self.rank:
                continue
            p = &self.peers[r]
            ring = register_with_random_key(
                self.domain_obj, sizeof(uint64_t) if p.notify_only else self.ring_bytes,
                FI_REMOTE_WRITE, self.ep_obj)
            self.rx_regions[r] = ring
            if not p.notify_only:
                p.rx_ring = ring.base
                p.tx_stage = self.tx_region.base + i * stage_bytes
                i += 1
        self.memory_registered = True
        return 0

    def plan_shared_rings(self, local_ranks):
        """Say which peers will move onto shared rings (use_shared_rings()):
        their fabric rings then carry bare notifications only, so neither
        those rings nor staging for them are registered at full size. Every
        rank of the host must plan the same group; call it before
        local_address()."""
        cdef int r
        if self.memory_registered:
            raise RuntimeError("plan_shared_rings() must come before local_address()")
        for r in local_ranks:
            if not 0 <= r < self.size:
                raise ValueError(f"local rank {r} is not in 0..{self.size - 1}")
            if r != self.rank:
                self.peers[r].notify_only = True

    # ---- set-up: address blobs ---------------------------------------------------

    def unlink_region_name(self):
        """After every peer has connected and greeted us: drop our endpoint's
        name in /dev/shm (shm provider only), so no death can leave it behind."""
        return self.ep_obj.unlink_region()

    def local_address(self) -> bytes:
        """What every peer needs to write to us, as a versioned blob (wire.h:
        bls_address_header_t, the endpoint name, one ring entry per rank)."""
        cdef bls_address_header_t hdr
        cdef bls_ring_address_t entry
        cdef RegisteredBuffer ring
        cdef bytes name = self.ep_obj.name()
        cdef size_t name_room = bls_align(len(name))
        self.register_memory()
        cdef size_t total = sizeof(hdr) + name_room + <size_t>self.size * sizeof(entry)
        cdef bytearray blob = bytearray(total)
        cdef char* out = blob
        cdef int r
        memset(&hdr, 0, sizeof(hdr))
        hdr.magic, hdr.version, hdr.header_bytes = BLS_ADDRESS_MAGIC, BLS_ADDRESS_VERSION, sizeof(hdr)
        hdr.rank, hdr.size = self.rank, self.size
        hdr.slot_bytes, hdr.ring_slots = self.slot_bytes, self.ring_slots
        hdr.name_bytes, hdr.ring_bytes = len(name), self.ring_bytes
        memcpy(out, &hdr, sizeof(hdr))
        memcpy(out + sizeof(hdr), <const char*>name, len(name))
        for r in range(self.size):
            if r == self.rank:
                continue
            ring = self.rx_regions[r]
            entry.addr = ring.address if self.virt_addr else 0
            entry.key = ring.key
            memcpy(out + sizeof(hdr) + name_room + r * sizeof(entry), &entry, sizeof(entry))
        return bytes(blob)

    cdef int parse_address(self, int r, object blob, bls_address_header_t* hdr,
                           bls_ring_address_t* mine) except -1:
        """Check rank ``r``'s blob field by field; fill its header and the
        entry that says where this rank writes. Raises ValueError naming ``r``."""
        cdef const char* data
        cdef size_t length, expected, name_room
        cdef size_t own_name
        if not isinstance(blob, bytes):
            raise TypeError(f"address of rank {r} is a {type(blob).__name__}, not bytes")
        data, length = <const char*>(<bytes>blob), len(<bytes>blob)
        where = f"address blob of rank {r}"
        if length < sizeof(bls_address_header_t):
            raise ValueError(f"{where} is {length} bytes, shorter than its "
                             f"{sizeof(bls_address_header_t)}-byte header")
        memcpy(hdr, data, sizeof(bls_address_header_t))
        if hdr.magic != BLS_ADDRESS_MAGIC:
            raise ValueError(f"{where} is not a blsfab address (magic {hdr.magic:#x}); "
                             "is every rank running the same blsfab on the same kind of host?")
        if hdr.version != BLS_ADDRESS_VERSION or hdr.header_bytes != sizeof(bls_address_header_t):
            raise ValueError(f"{where} has format version {hdr.version} ({hdr.header_bytes}-byte "
                             f"header); this rank speaks version {BLS_ADDRESS_VERSION}: run the "
                             "same blsfab version on every rank")
        if hdr.rank != <uint32_t>r or hdr.size != <uint32_t>self.size:
            raise ValueError(f"{where} claims to be rank {hdr.rank} of {hdr.size}; expected "
                             f"rank {r} of {self.size}")
        if (hdr.slot_bytes != self.slot_bytes or hdr.ring_slots != <uint32_t>self.ring_slots
                or hdr.ring_bytes != self.ring_bytes):
            raise ValueError(f"ranks disagree on geometry: rank {r} has slot_bytes="
                             f"{hdr.slot_bytes}, ring_slots={hdr.ring_slots}; rank {self.rank} "
                             f"has slot_bytes={self.slot_bytes}, ring_slots={self.ring_slots}; "
                             "pass the same slot_bytes=, bound= and ring_slots= on every rank")
        if not (0 < hdr.name_bytes <= BLS_MAX_NAME_BYTES):
            raise ValueError(f"{where} has an endpoint name of {hdr.name_bytes} bytes; "
                             f"expected 1 to {BLS_MAX_NAME_BYTES}")
        own_name = len(self.ep_obj.name())
        if self.info.info.addr_format != FI_ADDR_STR and hdr.name_bytes != own_name:
            raise ValueError(f"{where} has an endpoint name of {hdr.name_bytes} bytes; provider "
                             f"{self.provider!r} uses {own_name}-byte addresses")
        # Every term is bounded above (name <= 256, size <= BLS_MAX_RANKS): no overflow.
        name_room = bls_align(hdr.name_bytes)
        expected = sizeof(bls_address_header_t) + name_room + <size_t>self.size * sizeof(bls_ring_address_t)
        if length != expected:
            raise ValueError(f"{where} is {length} bytes; its header implies {expected}")
        memcpy(mine, data + sizeof(bls_address_header_t) + name_room
               + <size_t>self.rank * sizeof(bls_ring_address_t), sizeof(bls_ring_address_t))
        if r == self.rank:
            return 0  # nobody writes to itself
        if self.virt_addr:
            if mine.addr == 0 or mine.addr > <uint64_t>-1 - self.ring_bytes:
                raise ValueError(f"{where} puts our ring at {mine.addr:#x}, which is no address")
        elif mine.addr != 0:
            raise ValueError(f"{where} puts our ring at offset {mine.addr:#x}; provider "
                             f"{self.provider!r} addresses rings by offset from 0")
        return 0

    def connect(self, list blobs not None):
        """Check every rank's address blob (from local_address()), insert its
        endpoint and learn where our ring sits on it. Raises ValueError (or
        FabricError from the provider) naming the rank whose blob is bad."""
        cdef int r
        cdef Peer* p
        cdef bls_address_header_t hdr
        cdef bls_ring_address_t mine
        cdef bytes name
        self.check_usable(False)
        self.register_memory()  # normally done by local_address(); never traffic without it
        if len(blobs) != self.size:
            raise ValueError(f"connect needs {self.size} address blobs, one per rank; "
                             f"got {len(blobs)}")
        for r in range(self.size):
            self.parse_address(r, blobs[r], &hdr, &mine)
            if r == self.rank:
                continue
            p = &self.peers[r]
            # The provider reads as many bytes as its address format needs:
            # hand it a zero-padded buffer, never fewer bytes than it may read.
            name = (<bytes>blobs[r])[sizeof(hdr):sizeof(hdr) + hdr.name_bytes]
            name += bytes(BLS_MAX_NAME_BYTES + 8 - hdr.name_bytes)
            try:
                self.av_obj.insert(name, &p.addr)
            except FabricError as exc:
                raise FabricError(f"rank {self.rank}: the endpoint address of rank {r} was "
                                  f"refused: {exc}", provider=self.provider, errno=exc.errno,
                                  strerror=exc.strerror) from exc
            p.ring_addr = mine.addr
            # A shared-ring peer registered only the notification word for us.
            p.scratch_addr = mine.addr + (0 if p.notify_only
                                          else <uint64_t>self.ring_slots * self.slot_bytes)
            p.key = mine.key

    def use_shared_rings(self, rings):
        """Move the same-host peers of ``rings`` (a node_local.NodeLocalRings
        with this engine's geometry) onto the node-local path. Call it on
        every rank of the host after connect() and before any traffic."""
        cdef SharedSegment own, theirs
        cdef Peer* p
        cdef int r, mine, yours
        self.check_usable()
        if self.posted or self.reserved:
            raise RuntimeError("use_shared_rings() must come before the first iteration")
        own = rings.own
        if own is None or own.ring_slots != <uint64_t>self.ring_slots or own.slot_bytes != self.slot_bytes:
            raise ValueError(f"shared rings of {own!r} do not match ring_slots="
                             f"{self.ring_slots}, slot_bytes={self.slot_bytes}")
        planned = [r for r in range(self.size) if r != self.rank and self.peers[r].notify_only]
        if sorted(r for r in rings.local if r != self.rank) != planned:
            raise ValueError(f"shared rings with ranks {list(rings.local)} were not planned: "
                             f"plan_shared_rings() named {planned}; plan the same group "
                             "before local_address()")
        for r in rings.local:
            if r == self.rank:
                continue
            if not 0 <= r < self.size:
                raise ValueError(f"local rank {r} is not in 0..{self.size - 1}")
            theirs = rings.peers[r]
            mine = rings.ring_index(self.rank, r)    # r's ring in our segment
            yours = rings.ring_index(r, self.rank)   # our ring in r's segment
            p = &self.peers[r]
            p.rx_ring = own.slots(mine)
            p.rx_published = own.landed_words(mine)
            p.rx_consumed_word = own.consumed_word(mine)
            p.tx_shared = theirs.slots(yours)
            p.tx_published = theirs.landed_words(yours)
            p.tx_consumed = theirs.consumed_word(yours)
            p.local = True
            self.nlocal += 1
        self.shared_rings = rings

    def set_zero_copy(self, size_t threshold):
        """Send records of at least ``threshold`` bytes (0: none) to fabric
        peers straight from the caller's buffer, in a 2-iov write with the
        header from staging. Providers that need local registration
        (FI_MR_LOCAL, e.g. verbs) keep staging: the caller's memory is not
        registered. Staging then holds only what is copied: records below the
        threshold, and headers. Call it before local_address(). Returns the
        threshold in effect."""
        if self.memory_registered:
            raise RuntimeError("set_zero_copy() must come before local_address()")
        self.zero_copy_bytes = 0 if self.info.mr_mode & FI_MR_LOCAL else threshold
        self.stage_slot_bytes = self.slot_bytes
        if self.zero_copy_bytes and SLOT_OVERHEAD + bls_align(self.zero_copy_bytes) < self.slot_bytes:
            self.stage_slot_bytes = SLOT_OVERHEAD + bls_align(self.zero_copy_bytes)
        return self.zero_copy_bytes

    def paths(self):
        """How each rank is reached: 'self', 'shared' (node-local rings) or 'fabric'."""
        return ["self" if r == self.rank else "shared" if self.peers[r].local else "fabric"
                for r in range(self.size)]

    def greet(self, double timeout):
        """Warm every connection: one bare notification to each peer, then wait
        until every peer's has arrived. tcp;ofi_rxm connects on demand, so
        this takes the connection cost out of the first iteration."""
        cdef int r, rc = RC_OK
        cdef double deadline = monotonic() + timeout
        self.check_usable(False)
        self.enter()
        with nogil:
            for r in range(self.size):
                if r != self.rank:
                    rc = self.notify(r, bls_imm_encode(BLS_KIND_CREDIT, self.rank, 0), deadline)
                    if rc < 0:
                        break
                    rc = RC_OK
            if rc == RC_OK:
                rc = self.wait_greeted(deadline)
        self.leave()
        if rc == RC_TIMEOUT:
            missing = [r for r in range(self.size) if r != self.rank and not self.peers[r].greeted]
            raise BlsTimeoutError(
                f"rank {self.rank}: connection warm-up heard nothing from ranks {missing} "
                f"within {timeout:g} s; are they running and using provider {self.provider!r}?",
                iteration=-1, ranks=missing)
        self.check_rc(rc)

    # ---- waits (each one a condition over wait_step) ----------------------------

    cdef int wait_heard_nogil(self, int64_t need, double deadline) noexcept nogil:
        cdef int rc
        # Iterations below ``need`` must be complete when this returns, so
        # their zero-copy writes must be done too.
        while self.min_heard() < need or self.writes_pending_before(need):
            rc = self.wait_step(deadline, -1)
            if rc < 0:
                return rc
        return RC_OK

    cdef inline bint writes_pending_before(self, int64_t need) noexcept nogil:
        """Does a zero-copy write of an iteration below ``need`` still read
        its send buffer? Checked on every poll of the bound wait, so it is
        one comparison: on_write_done keeps zero_copy_low current."""
        return self.zero_copy_inflight > 0 and self.zero_copy_low < need

    cdef int wait_state(self, IterState* st, double deadline) noexcept nogil:
        cdef int rc
        while not st.detached:
            rc = self.wait_step(deadline, -1)
            if rc < 0:
                return rc
        return RC_OK

    cdef int wait_greeted(self, double deadline) noexcept nogil:
        cdef int r = 0, rc
        while r < self.size:
            if r == self.rank or self.peers[r].greeted:
                r += 1
                continue
            rc = self.wait_step(deadline, r)
            if rc < 0:
                return rc
        return RC_OK

    # ---- posting ------------------------------------------------------------------

    cdef int post_failed(self, int rc, object requests, uint64_t puts_before) except -1:
        """The failure model of a post. If nothing left (no write went out and
        no poll failed), give the iterations back: the communicator stays
        usable and the next call reuses their numbers. Otherwise peers may
        hold part of an iteration, so the engine is broken. ``requests`` is
        the list posted, or the one Request of an unchained call."""
        cdef Request req
        cdef int64_t first
        if isinstance(requests, Request):
            requests = [requests]
        first = (<Request>requests[0]).iteration
        if (not self.fatal and self.counters.puts == puts_before
                and self.reserved == self.posted + len(requests)):
            for req in requests:
                req.abandon()  # its receive state stays, for the retry
            self.reserved = self.posted
        else:
            self.fatal = True
        return self.check_rc(rc, first, "posting")

    cdef int post_requests(self, object requests, SendItem* items, int m, double deadline,
                           bint keep_gil) except -1:
        cdef uint64_t puts_before = self.counters.puts
        cdef int rc
        self.enter()
        if keep_gil:
            # Releasing the GIL costs more than a small post; the wait
            # primitive releases it anyway if the post has to wait.
            self.gil_held = True
            rc = self.post_items(items, m, deadline)
            self.take_gil_back()
        else:
            with nogil:
                self.lock()
                rc = self.post_items(items, m, deadline)
                self.unlock()
        self.leave()
        if rc < 0:
            self.post_failed(rc, requests, puts_before)
        return 0

    def post(self, list requests not None, double timeout, int64_t bound=-1):
        """Post prepared Requests as consecutive iterations, packed per peer;
        with ``bound`` >= 0, then wait until every peer has posted the last of
        them minus ``bound``."""
        cdef int m = len(requests)
        cdef int k
        cdef SendItem* items
        cdef Request req
        cdef int64_t send_bytes = 0
        cdef double deadline = monotonic() + timeout
        self.check_usable()
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
                send_bytes += req.send_bytes
            self.post_requests(requests, items, m, deadline,
                               send_bytes < NOGIL_BYTES and not self.threaded)
        finally:
            free(items)
            for k in range(m):
                (<Request>requests[k]).release_send()
        if bound >= 0:
            self._await_heard(self.posted - bound, deadline, timeout)

    def ialltoallv(self, object sendbuf, object sendcounts, int64_t bound, double timeout):
        """The unchained fast path in one call: validate, post, then wait until
        every peer has posted this iteration minus ``bound``."""
        return self.issue(sendbuf, sendcounts, bound, timeout)

    cdef Request issue(self, object sendbuf, object sendcounts, int64_t bound, double timeout):
        cdef Request req
        cdef double deadline
        self.check_usable()
        if self.reserved != self.posted:
            raise RuntimeError(
                f"iterations {self.posted}..{self.reserved - 1} were prepared but not posted; "
                f"the next iteration to post is {self.posted}: post() them first")
        req = Request._create(self, sendbuf, sendcounts)
        deadline = monotonic() + timeout
        try:
            self.post_requests(req, &req.item, 1, deadline,
                               req.send_bytes < NOGIL_BYTES and not self.threaded)
        finally:
            req.release_send()
        self._await_heard(req.iteration + 1 - bound, deadline, timeout)
        return req

    def wait_heard(self, int64_t need, double timeout):
        """Block, progressing, until every peer has posted ``need`` iterations.
        Returns the lead: iterations posted here beyond the slowest peer."""
        self.check_usable(False)
        return self._await_heard(need, monotonic() + timeout, timeout)

    cdef int64_t _await_heard(self, int64_t need, double deadline, double timeout) except? -1:
        """The bounded-lag wait; returns the lead it leaves. A timeout here
        leaves the communicator usable: every post is complete."""
        cdef int rc
        if self.min_heard() < need or self.writes_pending_before(need):
            self.enter()
            with nogil:
                self.lock()
                rc = self.wait_heard_nogil(need, deadline)
                self.unlock()
            self.leave()
            self.check_rc(rc, self.posted - 1, "", need, timeout)
        return self.note_lead()

    cdef int64_t note_lead(self):
        cdef int64_t lead = self.posted - self.min_heard()
        if lead > self.counters.max_lead:
            self.counters.max_lead = lead
        self.counters.lead_sum += lead
        self.counters.lead_samples += 1
        return lead

    def prepare(self, object sendbuf, object sendcounts):
        """Validate one iteration's arguments and reserve its iteration number.
        Nothing is sent: pass the Request to post()."""
        return self.prepare_request(sendbuf, sendcounts)

    cdef Request prepare_request(self, object sendbuf, object sendcounts):
        self.check_usable()
        return Request._create(self, sendbuf, sendcounts)

    # ---- progress, introspection, tuning ---------------------------------------------

    def make_progress(self):
        """Poll the completion queue once. Returns the number of completions."""
        cdef int n
        self.check_usable(False)
        self.lock()
        n = self.progress()
        self.unlock()
        self.check_rc(n)
        return n

    def progress_for_teardown(self):
        """make_progress for the barrier of close(): any thread may close once
        the owner is done, and a broken engine joins without polling."""
        cdef int n
        if self.closed or self.broken:
            return 0
        self.lock()
        n = self.progress()
        self.unlock()
        self.check_rc(n)
        return n

    def _send_notification(self, int dst, uint32_t imm, double timeout=5.0):
        """Testing only: send ``imm`` to ``dst`` as a bare notification, as a
        hostile or corrupt peer could."""
        cdef int rc
        cdef double deadline = monotonic() + timeout
        self.check_usable(False)
        if not (0 <= dst < self.size) or dst == self.rank:
            raise ValueError(f"dst={dst} is not a peer")
        with nogil:
            self.lock()
            rc = self.notify(dst, imm, deadline)
            self.unlock()
        self.check_rc(rc)

    def _handle_notification(self, uint32_t imm):
        """Testing only: handle ``imm`` as if a peer's notification had just
        arrived, to check how forged or corrupt ones are treated."""
        cdef int rc
        self.check_usable(False)
        self.lock()
        rc = self.on_notification(imm)
        self.unlock()
        if rc < 0:
            self.fatal = True
        self.check_rc(rc)

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

    cdef size_t spare_bytes(self):
        """Heap held for reuse: spare receive states and small pieces."""
        cdef size_t n = self.nspare * iter_state_bytes(self.size)
        cdef int c
        for c in range(PIECE_CLASSES):
            n += self.nspare_pieces[c] * (<size_t>1 << (PIECE_MIN_SHIFT + c))
        return n

    def counters_dict(self):
        c = self.counters
        return {
            "puts": c.puts, "injects": c.injects, "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received, "blocked_posts": c.blocked_posts,
            "credits_sent": c.credits_sent, "credit_requests": c.credit_requests,
            "eagain_retries": c.eagain,
            "early_arrivals": c.early_arrivals, "in_place": c.in_place,
            "spilled": c.spilled, "max_lead": c.max_lead, "zero_copy": c.zero_copy,
            "zero_copy_bytes": self.zero_copy_bytes,
            "mean_lead": (<double>c.lead_sum / c.lead_samples) if c.lead_samples else 0.0,
            "ring_bytes": sum(b.nbytes for b in self.rx_regions if b is not None)
                          if self.rx_regions is not None else 0,
            "shared_bytes": self.shared_rings.mapped_bytes if self.shared_rings is not None else 0,
            "paths": self.paths(),
            "staging_bytes": self.tx_region.nbytes if self.tx_region is not None else 0,
            "spare_bytes": self.spare_bytes(),
            "ring_slots": self.ring_slots, "slot_bytes": self.slot_bytes,
            "inject_limit": self.inject_limit, "selective_completion": self.selective,
            "fabric": self.info.fabric_name, "domain": self.info.domain_name,
            "nic": self.info.chosen.get("device") if self.info.chosen else None,
            "source_checked": self.check_source,
        }

    # ---- lifetime -----------------------------------------------------------------

    def close(self):
        """Release every libfabric resource, even on a broken engine. Pending
        receive states are handed to their Requests (which then report the
        closed communicator) or freed. A resource the provider refuses to
        close is reported (FabricError) after everything else is released;
        memory whose registration could not be closed is never freed."""
        cdef int64_t i
        cdef int s
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
        # Completed iterations still reading rings: copy their records out, so
        # their Requests can still assemble them once the rings are gone.
        while self.held_list != NULL:
            st = self.held_list
            self.held_list = st.next_held
            st.next_held = NULL
            for s in range(st.nranks):
                if st.held[s] and self.copy_out(st, s) < 0:
                    st.closed = True  # out of memory: the Request reports the close
                    st.held[s] = 0
                    st.data[s] = NULL
        failures = []
        regions = [b for b in (self.rx_regions or []) if b is not None]
        if self.view_holds:
            # Live views still read these rings: keep their memory (until exit).
            for ring in regions:
                (<RegisteredBuffer>ring).base = NULL
            if self.shared_rings is not None and self.shared_rings.own is not None:
                (<SharedSegment>self.shared_rings.own).forget()
        for obj in [self.ep_obj, *regions, self.tx_region, self.av_obj, self.cq_obj,
                    self.domain_obj, self.fabric_obj]:
            if obj is None:
                continue
            try:
                obj.close()
            except FabricError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def __dealloc__(self):
        try:
            self.close()
        except FabricError:
            pass  # nothing to report to from here; the memory stays allocated


IMM_WANT = BLS_IMM_WANT


def imm_encode(uint32_t kind, uint32_t rank, uint64_t count):
    """The 32-bit remote CQ data for a notification (see include/blsfab/wire.h)."""
    return bls_imm_encode(kind, rank, count)


def imm_decode(uint32_t imm, uint64_t floor):
    """(kind, rank, count) of ``imm``, rebuilding the count from ``floor``."""
    return (bls_imm_kind(imm), bls_imm_rank(imm), floor + bls_imm_count_delta(imm, floor))
