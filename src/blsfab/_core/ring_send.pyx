# RingSender: what leaves. Credit windows, slot packing and the writes.


cdef class RingSender(RingProgress):

    cdef int acquire_slot(self, int dst, double deadline) noexcept nogil:
        """Wait until slot ``tx_seq`` towards ``dst`` is free: the peer has
        consumed what was last written there. If not yet, ask for the credit
        with a WANT notification, then wait."""
        cdef Peer* p = &self.peers[dst]
        cdef uint64_t seq = p.tx_seq
        cdef int rc
        rc = self.refresh_credit(dst)
        if rc < 0:
            return rc
        if seq < p.tx_credit + self.ring_slots:
            return RC_OK
        self.counters.blocked_posts += 1
        rc = self.notify(dst, bls_imm_encode(BLS_KIND_CREDIT, self.rank,
                                             seq - self.ring_slots + 1) | BLS_IMM_WANT, deadline)
        if rc < 0:
            return rc
        self.counters.credit_requests += 1
        while seq >= p.tx_credit + self.ring_slots:
            rc = self.wait_step(deadline, dst)
            if rc == RC_OK:
                rc = self.refresh_credit(dst)
            if rc < 0:
                return rc
        return RC_OK

    cdef int refresh_credit(self, int dst) noexcept nogil:
        """On the node-local path the peer publishes its credit in shared
        memory (acquire: its reads of those slots are over)."""
        cdef Peer* p = &self.peers[dst]
        cdef uint64_t consumed
        if not p.local:
            return RC_OK
        consumed = bls_shm_consumed(p.tx_consumed)
        if consumed > p.tx_seq:
            return self.protocol_error(PE_CREDIT_UNSENT, dst, <int64_t>consumed)
        if consumed > p.tx_credit:
            p.tx_credit = consumed
        return RC_OK

    cdef int write_slot(self, int dst, size_t length, bint more, double deadline) noexcept nogil:
        """Write staging slot ``tx_seq`` to ``dst``; data and notification
        travel in one operation. Small slots are injected (no completion at
        all); others go unsignalled where the provider allows, with FI_MORE
        while more writes of the same post follow."""
        cdef Peer* p = &self.peers[dst]
        cdef size_t pos = p.tx_seq % self.ring_slots
        cdef iovec iov
        cdef fi_rma_iov rma
        cdef fi_msg_rma msg
        cdef uint64_t flags = FI_REMOTE_CQ_DATA
        if p.local:
            # Packed in place in the peer's ring: publishing is the whole write.
            bls_shm_publish(&p.tx_published[pos], p.tx_seq)
            self.counters.puts += 1
            p.tx_seq += 1
            return RC_OK
        iov.iov_base, iov.iov_len = p.tx_stage + pos * self.stage_slot_bytes, length
        self.slot_message(dst, &iov, &self.tx_desc, 1, length, &rma, &msg,
                          &self.tx_ctx[dst * self.ring_slots + pos].ctx)
        if more:
            flags |= FI_MORE
        if not self.selective:
            flags |= FI_COMPLETION
        return self.post_write(dst, &msg, flags, length <= self.inject_limit, deadline)

    cdef int write_slot_zero_copy(self, int dst, size_t header, const char* payload, size_t n,
                                  bint more, IterState* st, double deadline) noexcept nogil:
        """Write slot ``tx_seq`` to ``dst`` as two pieces: its ``header`` bytes
        from staging, then the payload straight from the caller's buffer. The
        iteration completes only after this write's local completion."""
        cdef Peer* p = &self.peers[dst]
        cdef size_t pos = p.tx_seq % self.ring_slots
        cdef size_t i = dst * self.ring_slots + pos
        cdef iovec iov[2]
        cdef void* desc[2]
        cdef fi_rma_iov rma
        cdef fi_msg_rma msg
        cdef uint64_t flags = FI_REMOTE_CQ_DATA | FI_COMPLETION
        cdef int rc
        iov[0].iov_base = p.tx_stage + pos * self.stage_slot_bytes
        iov[0].iov_len = header
        iov[1].iov_base, iov[1].iov_len = <void*>payload, n
        desc[0], desc[1] = self.tx_desc, NULL
        self.slot_message(dst, iov, desc, 2, header + n, &rma, &msg, &self.zero_copy_ctx[i].ctx)
        if more:
            flags |= FI_MORE
        # The receiver may free a slot before our write of it completes here:
        # its context is reused only once that completion is in.
        while self.tx_zero_copy[i] != NULL:
            rc = self.wait_step(deadline, dst)
            if rc < 0:
                return rc
        rc = self.post_write(dst, &msg, flags, False, deadline)
        if rc < 0:
            return rc
        self.tx_zero_copy[i] = st
        st.tx_pending += 1
        if self.zero_copy_inflight == 0 or st.iteration < self.zero_copy_low:
            self.zero_copy_low = st.iteration
        self.zero_copy_inflight += 1
        self.counters.zero_copy += 1
        return RC_OK

    cdef inline void slot_message(self, int dst, iovec* iov, void** desc, size_t iov_count,
                                  size_t length, fi_rma_iov* rma, fi_msg_rma* msg,
                                  void* context) noexcept nogil:
        """Describe the write of slot ``tx_seq`` to ``dst``: ``length`` bytes
        gathered from ``iov``, into that slot of our ring on the peer, with
        the slot's notification as remote CQ data."""
        cdef Peer* p = &self.peers[dst]
        rma.addr = p.ring_addr + (p.tx_seq % self.ring_slots) * self.slot_bytes
        rma.len, rma.key = length, p.key
        msg.msg_iov, msg.desc, msg.iov_count = iov, desc, iov_count
        msg.addr, msg.rma_iov, msg.rma_iov_count = p.addr, rma, 1
        msg.context = context
        msg.data = bls_imm_encode(BLS_KIND_DATA, self.rank, p.tx_seq)

    cdef int post_write(self, int dst, fi_msg_rma* msg, uint64_t flags, bint inject,
                        double deadline) noexcept nogil:
        """Post the write ``msg`` describes (one slot and its notification),
        retrying while the provider's queue is full or a tcp connection is
        still being made, then count it: the slot's sequence number is used.
        ``inject`` sends its single iov with fi_inject_writedata instead,
        which needs no completion and leaves the buffer free at once."""
        cdef ssize_t ret
        cdef int rc
        while True:
            if inject:
                ret = fi_inject_writedata(self.ep, msg.msg_iov[0].iov_base, msg.msg_iov[0].iov_len,
                                          msg.data, msg.addr, msg.rma_iov[0].addr,
                                          msg.rma_iov[0].key)
            else:
                ret = fi_writemsg(self.ep, msg, flags)
            if ret == 0:
                break
            if ret != -FI_EAGAIN:
                return self.fail(RC_FABRIC, <int>ret,
                                 "fi_inject_writedata" if inject else "fi_writemsg", dst, 0, 0)
            self.counters.eagain += 1
            rc = self.wait_step(deadline, dst)
            if rc < 0:
                return rc
        if inject:
            self.counters.injects += 1
        self.counters.puts += 1
        self.peers[dst].tx_seq += 1
        return RC_OK

    cdef int drain_writes(self, IterState* st, double deadline) noexcept nogil:
        """Progress until no zero-copy write of ``st`` reads its send buffer."""
        cdef int rc
        while st.tx_pending > 0:
            rc = self.wait_step(deadline, -1)
            if rc < 0:
                return rc
        return RC_OK

    cdef int post_items(self, SendItem* items, int m, double deadline) noexcept nogil:
        """Post ``m`` consecutive iterations: per peer, pack as many records as
        fit into each slot, so a chain travels as one write per peer. This
        rank's own messages are delivered last, once every write is out: a
        post that fails before its first write has changed nothing."""
        cdef int k, j, dst, rc
        cdef size_t off, n, need, limit
        cdef uint64_t credit
        cdef char* stage
        cdef bls_slot_header_t* hdr
        cdef Peer* p
        cdef const char* payload
        cdef const char* zero_copy
        cdef IterState* zero_copy_state
        for j in range(1, self.size):
            dst = (self.rank + j) % self.size  # stagger targets to avoid hot spots
            p = &self.peers[dst]
            k = 0
            while k < m:
                rc = self.acquire_slot(dst, deadline)
                if rc < 0:
                    return rc
                # Packed straight into the peer's shared ring, or into staging,
                # which holds less than a slot when large records skip it.
                limit = self.slot_bytes if p.local else self.stage_slot_bytes
                stage = ((p.tx_shared if p.local else p.tx_stage)
                         + (p.tx_seq % self.ring_slots) * limit)
                hdr = <bls_slot_header_t*>stage
                hdr.seq = p.tx_seq
                hdr.first_iteration = <uint64_t>items[k].state.iteration
                hdr.nrecords = 0
                hdr.magic = BLS_SLOT_MAGIC
                off = sizeof(bls_slot_header_t)
                zero_copy = NULL
                while k < m:
                    n = items[k].counts[dst] * items[k].itemsize
                    need = sizeof(bls_record_header_t) + bls_align(n)
                    if off + need > limit and hdr.nrecords > 0:
                        break  # next record starts the next slot
                    payload = items[k].data + items[k].displs[dst] * items[k].itemsize
                    (<bls_record_header_t*>(stage + off)).word = bls_record_pack(n, items[k].dtype)
                    if (not p.local and self.zero_copy_bytes and n >= self.zero_copy_bytes
                            and hdr.nrecords == 0):
                        # Large and alone in its slot: the payload goes from the
                        # caller's buffer, not through staging.
                        zero_copy, zero_copy_state = payload, items[k].state
                        off += sizeof(bls_record_header_t)
                        hdr.nrecords = 1
                        self.counters.bytes_sent += n
                        k += 1
                        break
                    memcpy(stage + off + sizeof(bls_record_header_t), payload, n)
                    off += need
                    hdr.nrecords += 1
                    self.counters.bytes_sent += n
                    k += 1
                credit = p.rx_consumed
                hdr.credit = credit  # piggy-backed credit
                # FI_MORE only while more slots for this same peer follow: a
                # provider that batches per connection flushes at the last one.
                if zero_copy != NULL:
                    rc = self.write_slot_zero_copy(dst, off, zero_copy, n, k < m,
                                                   zero_copy_state, deadline)
                else:
                    rc = self.write_slot(dst, off, k < m, deadline)
                if rc < 0:
                    return rc
                # A write that had to wait progressed meanwhile, and may have
                # answered a WANT with a newer credit: what we reported only
                # ever grows (a peer's WANT is measured from it).
                if credit > p.rx_reported:
                    p.rx_reported = credit
        for k in range(m):
            items[k].state.posted = True
            # The self part stays in the sendbuf until the result is assembled:
            # one copy, straight into the result (the MPI send-buffer rule).
            items[k].state.borrowed_src = self.rank
            n = items[k].counts[self.rank] * items[k].itemsize
            rc = self.deliver(items[k].state, self.rank,
                              items[k].data + items[k].displs[self.rank] * items[k].itemsize,
                              n, items[k].dtype)
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
