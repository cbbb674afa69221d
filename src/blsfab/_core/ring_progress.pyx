# RingProgress: polling the completion queue, the one wait primitive, bare
# notifications and credits, and the optional progress thread.
#
# Progress is manual on shm and tcp: written data lands, and notifications
# arrive, only while we read the CQ. So every wait in the engine is "poll,
# then spin or yield, until a condition or a deadline", and that loop lives in
# one place: wait_step().
#
# Credits. A sender may use slot sequence q only when q < credit + ring_slots,
# where credit counts the slots the receiver has consumed. The receiver
# reports its count in the header of every slot it writes back (every
# iteration writes to every peer). A sender that still finds its ring full
# sends a bare WANT notification; the receiver answers with a bare credit as
# soon as it has consumed enough. Steady state sends no bare credits at all.
# A slot is therefore never overwritten before its receiver is done with it,
# on any provider, including verbs where writes land without the target's CPU.


cdef class RingProgress(RingReceiver):

    cdef int progress(self) noexcept nogil:
        """Handle one batch of completions, both directions. Returns the
        number handled (0 when idle) or a negative RC_ code. Any failure here
        breaks the engine; entries of the batch not yet handled are kept."""
        cdef ssize_t n
        cdef int rc, handled = 0
        cdef fi_cq_data_entry* e
        if self.nlocal:
            handled = self.poll_shared()
            if handled < 0:
                self.fatal = True
                return handled
        if self.batch_next == self.batch_len:
            if self.check_source:
                n = fi_cq_readfrom(self.cq, self.batch, 16, self.batch_source)
            else:
                n = fi_cq_read(self.cq, self.batch, 16)
            if n == -FI_EAGAIN:
                n = 0
            elif n < 0:
                self.fatal = True
                if n == -FI_EAVAIL:
                    self.read_cq_error()
                return self.fail(RC_FABRIC, <int>n, "fi_cq_read", -1, 0, 0)
            self.batch_next, self.batch_len = 0, <int>n
        while self.batch_next < self.batch_len:
            e = &self.batch[self.batch_next]
            self.batch_next += 1
            handled += 1
            # Classify by flags: shm may leave a non-NULL op_context on a remote
            # write's entry, and sockets flags the initiator's entry with
            # FI_REMOTE_CQ_DATA; only the target's carries FI_REMOTE_WRITE.
            # Our own writes' entries (providers without selective completion)
            # need nothing: credits, not completions, recycle staging slots.
            if e.flags & FI_REMOTE_WRITE and e.flags & FI_REMOTE_CQ_DATA:
                if self.check_source:
                    rc = self.check_writer(e.data, self.batch_source[self.batch_next - 1])
                    if rc < 0:
                        self.fatal = True
                        return rc
                rc = self.on_notification(e.data)
                if rc < 0:
                    self.fatal = True
                    return rc
            elif self.zero_copy_bytes:
                rc = self.on_write_done(e.op_context)
                if rc < 0:
                    self.fatal = True
                    return rc
        if self.credits_due:
            rc = self.return_credits()
            if rc < 0:
                self.fatal = True
                return rc
        return handled

    cdef int check_writer(self, uint64_t imm, fi_addr_t source) noexcept nogil:
        """The rank a notification names must own the endpoint that wrote it."""
        cdef uint32_t claimed = bls_imm_rank(imm)
        cdef int r
        if (source == FI_ADDR_NOTAVAIL or claimed >= <uint32_t>self.size
                or claimed == <uint32_t>self.rank or self.peers[claimed].addr == source):
            return RC_OK  # unknown writer, or on_notification rejects the rank itself
        for r in range(self.size):
            if r != self.rank and self.peers[r].addr == source:
                return self.protocol_error(PE_SPOOFED, r, claimed)
        return self.protocol_error(PE_SPOOFED, -1, claimed)

    cdef int on_write_done(self, void* context) noexcept nogil:
        """Our write completed: a zero-copy one no longer reads the send
        buffer, and its iteration may complete."""
        cdef char* first = <char*>self.zero_copy_ctx
        cdef size_t i
        cdef IterState* st
        if <char*>context < first or <char*>context >= first + <size_t>self.size * self.ring_slots * sizeof(TxContext):
            return RC_OK
        i = (<char*>context - first) // sizeof(TxContext)
        st = self.tx_zero_copy[i]
        if st == NULL:
            return RC_OK
        self.tx_zero_copy[i] = NULL
        st.tx_pending -= 1
        self.zero_copy_inflight -= 1
        if st.tx_pending == 0 and st.iteration == self.zero_copy_low:
            self.find_zero_copy_low()
        if st.tx_pending == 0 and st.posted and st.arrived == st.nranks and not st.detached:
            return self.complete(st)
        return RC_OK

    cdef void find_zero_copy_low(self) noexcept nogil:
        """The oldest iteration still reading its send buffer, from the writes
        in flight (one entry per peer and slot: a short scan, done only when
        the oldest one finishes, never per poll)."""
        cdef size_t i
        cdef IterState* st
        self.zero_copy_low = INT64_MAX
        for i in range(<size_t>self.size * self.ring_slots):
            st = self.tx_zero_copy[i]
            if st != NULL and st.iteration < self.zero_copy_low:
                self.zero_copy_low = st.iteration

    cdef void read_cq_error(self) noexcept nogil:
        """Keep the error completion at the head of the CQ for the report."""
        cdef const char* text
        memset(&self.err_entry, 0, sizeof(self.err_entry))
        self.err_text[0] = 0
        if fi_cq_readerr(self.cq, &self.err_entry, 0) < 0:
            strncpy(self.err_text, "unreadable error completion", sizeof(self.err_text) - 1)
            return
        text = fi_cq_strerror(self.cq, self.err_entry.prov_errno, self.err_entry.err_data,
                              self.err_text, sizeof(self.err_text))
        if text != NULL and text != <const char*>self.err_text:
            strncpy(self.err_text, text, sizeof(self.err_text) - 1)
        self.err_text[sizeof(self.err_text) - 1] = 0

    cdef int wait_step(self, double deadline, int rank) noexcept nogil:
        """The wait primitive: every loop that waits for a condition calls this
        until the condition holds. It polls once; when that found nothing it
        spins a little (a reply is often microseconds away), then gives the
        core away, so oversubscribed ranks do not starve each other. Past
        ``deadline`` it fails with RC_TIMEOUT naming ``rank`` (-1: the caller
        names the ranks). A post that kept the GIL releases it here: it has
        to wait, and other threads should run meanwhile. The clock is read only
        now and then, as it may be a system call in a VM."""
        cdef int n
        if self.gil_held and self.gil_saved == NULL:
            self.gil_saved = PyEval_SaveThread()
        n = self.progress()
        if n != 0:
            return n if n < 0 else RC_OK
        self.idle_polls += 1
        if self.idle_polls & self.spin_mask:
            return RC_OK
        if monotonic() > deadline:
            return self.fail(RC_TIMEOUT, 0, NULL, rank, 0, 0)
        sched_yield()
        return RC_OK

    cdef int notify(self, int dst, uint32_t imm, double deadline) noexcept nogil:
        """A bare notification (no payload) to ``dst``. With a negative
        deadline it is opportunistic: a full provider queue returns RC_OK and
        leaves the caller's state unchanged. Returns 1 once sent."""
        cdef Peer* p = &self.peers[dst]
        cdef ssize_t ret
        cdef int rc
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
            rc = self.wait_step(deadline, dst)
            if rc < 0:
                return rc

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

    # ---- the progress thread ---------------------------------------------------

    def start_progress_thread(self):
        """Poll from a background thread (without the GIL) between calls, so
        data lands and credits flow while the caller computes."""
        import threading
        self.check_usable(False)
        if self.threaded:
            return
        self.thread_stop = False
        self.thread_rc = RC_OK
        self.threaded = True  # no thread yet, so nothing races this
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
                if n < 0:
                    # Keep the failure (fail() recorded its details) for the
                    # next call on any thread, which raises it as BrokenError.
                    self.thread_rc = n
                    pthread_mutex_unlock(&self.mutex)
                    break
                pthread_mutex_unlock(&self.mutex)
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
        pthread_mutex_lock(&self.mutex)
        self.threaded = False
        pthread_mutex_unlock(&self.mutex)
