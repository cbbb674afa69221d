# RingReceiver: what arrives. Notifications, slot checks, delivery, spilling.
#
# Rank d registers one ring of `ring_slots` slots for every other rank s, each
# its own memory region with its own key, which only s is given. Rank s writes
# iteration messages into its ring on d; one write carries the data and the
# 32-bit notification (wire.h) naming s and the slot's sequence number. d
# processes each sender's slots in sequence order, so iterations arrive in
# order. A record is copied out into its iteration's receive state as soon as
# it is processed, except a large one for an iteration d has already posted:
# that is read in place when the iteration completes, and its slot is held
# until then. A sender blocked on credits says so with a WANT notification;
# its slots are then never held (spill() copies out those already held), so
# waiting is never the only thing that frees a slot.
#
# Everything a peer writes is checked before use: sequence numbers against
# the credit window, headers, record sizes, iterations, and credits and WANT
# counts against what was really sent. A bad value is a protocol error
# naming the peer, and breaks the communicator.


cdef class RingReceiver(RingState):

    cdef int on_notification(self, uint64_t imm) noexcept nogil:
        cdef uint32_t src = bls_imm_rank(imm)
        cdef Peer* p
        cdef int32_t delta
        cdef uint64_t seq
        cdef int rc
        if src >= <uint32_t>self.size or src == <uint32_t>self.rank:
            return self.protocol_error(PE_NOT_A_PEER, src, 0)
        p = &self.peers[src]
        if bls_imm_kind(imm) == BLS_KIND_CREDIT:
            p.greeted = True
            if bls_imm_wants(imm):
                # The peer is blocked until we have consumed this many of its
                # slots. It can only be waiting for one slot beyond what we
                # last reported (its credit cannot be newer than our report).
                delta = bls_imm_count_delta(imm, p.rx_reported)
                if delta > 1:
                    return self.protocol_error(PE_WANT_UNSENT, src, p.rx_reported + delta)
                if delta > 0 and p.rx_reported + delta > p.rx_wanted:
                    p.rx_wanted = p.rx_reported + delta
                    self.credits_due = True
                    rc = self.spill(src)  # stop reading its slots in place
                    if rc < 0:
                        return rc
            else:
                delta = bls_imm_count_delta(imm, p.tx_credit)
                if delta > 0:
                    if p.tx_credit + delta > p.tx_seq:
                        return self.protocol_error(PE_CREDIT_UNSENT, src, p.tx_credit + delta)
                    p.tx_credit += delta
            return RC_OK
        if p.notify_only:
            # Its slots land in shared memory; its fabric ring is one word.
            return self.protocol_error(PE_DATA_ON_SHARED, src, 0)
        delta = bls_imm_count_delta(imm, p.rx_consumed)
        if delta < 0 or delta >= self.ring_slots:
            return self.protocol_error(PE_OUTSIDE_WINDOW, src, delta)
        seq = p.rx_consumed + delta
        if p.rx_landed[seq % self.ring_slots] != 0:
            return self.protocol_error(PE_SLOT_TWICE, src, <int64_t>seq)
        p.rx_landed[seq % self.ring_slots] = seq + 1
        while p.rx_landed[p.rx_processed % self.ring_slots] == p.rx_processed + 1:
            rc = self.process_slot(src)
            if rc < 0:
                return rc
        self.release_slots(src)
        return RC_OK

    cdef int process_slot(self, int src) noexcept nogil:
        cdef Peer* p = &self.peers[src]
        cdef size_t pos = p.rx_processed % self.ring_slots
        cdef char* slot = p.rx_ring + pos * self.slot_bytes
        cdef bls_slot_header_t* hdr = <bls_slot_header_t*>slot
        cdef size_t off = sizeof(bls_slot_header_t)
        cdef size_t room
        cdef uint64_t word, n
        cdef uint32_t k
        cdef int64_t it
        cdef IterState* st
        cdef int rc
        if hdr.magic != BLS_SLOT_MAGIC or hdr.seq != p.rx_processed:
            return self.protocol_error(PE_BAD_HEADER, src, <int64_t>p.rx_processed)
        if hdr.nrecords == 0 or hdr.nrecords > (self.slot_bytes - off) // sizeof(bls_record_header_t):
            return self.protocol_error(PE_RECORD_COUNT, src, hdr.nrecords)
        if hdr.first_iteration != <uint64_t>p.heard:
            return self.protocol_error(PE_ITERATION_ORDER, src, <int64_t>hdr.first_iteration)
        if hdr.credit > p.tx_seq:
            return self.protocol_error(PE_CREDIT_UNSENT, src, <int64_t>hdr.credit)
        if hdr.credit > p.tx_credit:
            p.tx_credit = hdr.credit
        for k in range(hdr.nrecords):
            it = p.heard
            # off never exceeds slot_bytes, so these subtractions cannot wrap.
            if self.slot_bytes - off < sizeof(bls_record_header_t):
                return self.protocol_error(PE_RECORD_OVERRUN, src, it)
            word = (<bls_record_header_t*>(slot + off)).word
            off += sizeof(bls_record_header_t)
            n = bls_record_nbytes(word)
            room = self.slot_bytes - off
            if n > room or bls_align(n) > room:
                return self.protocol_error(PE_RECORD_OVERRUN, src, it)
            rc = self.state_for(it, src, &st)
            if rc < 0:
                return rc
            if st.posted and n >= IN_PLACE_BYTES and p.rx_wanted == 0:
                # Large and awaited: read it in place when the iteration
                # completes, one copy from ring to result. Never while the
                # sender waits for a credit: holding would starve it.
                st.held[src] = pos + 1
                p.rx_holds[pos] += 1
                self.counters.in_place += 1
            rc = self.deliver(st, src, slot + off, n, bls_record_dtype(word))
            if rc < 0:
                return rc
            self.counters.bytes_received += n
            p.heard = it + 1
            off += bls_align(n)
        p.rx_processed += 1
        return RC_OK

    cdef void release_slots(self, int src) noexcept nogil:
        """Free processed slots, in order, once nothing reads them in place."""
        cdef Peer* p = &self.peers[src]
        cdef size_t pos
        cdef uint64_t before = p.rx_consumed
        while p.rx_consumed < p.rx_processed:
            pos = p.rx_consumed % self.ring_slots
            if p.rx_holds[pos]:
                break
            (<bls_slot_header_t*>(p.rx_ring + pos * self.slot_bytes)).magic = 0  # never stale
            p.rx_landed[pos] = 0
            p.rx_consumed += 1
            if p.rx_wanted:
                self.credits_due = True
        if p.local and p.rx_consumed != before:
            # After our last read of the freed slots: the sender may reuse them.
            # This is the credit report, so a WANT is measured from it.
            bls_shm_set_consumed(p.rx_consumed_word, p.rx_consumed)
            p.rx_reported = p.rx_consumed

    cdef int poll_shared(self) noexcept nogil:
        """Process every slot node-local peers have published, in order (the
        acquire load makes the slot's contents visible). Returns the number
        of slots processed or a negative RC_ code."""
        cdef int src, rc, handled = 0
        cdef Peer* p
        cdef size_t pos
        for src in range(self.size):
            p = &self.peers[src]
            if not p.local:
                continue
            while True:
                pos = p.rx_processed % self.ring_slots
                if bls_shm_landed(&p.rx_published[pos]) != p.rx_processed + 1:
                    break
                if p.rx_processed >= p.rx_consumed + self.ring_slots:
                    return self.protocol_error(PE_OUTSIDE_WINDOW, src, self.ring_slots)
                p.rx_landed[pos] = p.rx_processed + 1
                rc = self.process_slot(src)
                if rc < 0:
                    return rc
                handled += 1
            if handled:
                self.release_slots(src)
        return handled

    cdef int spill(self, int src) noexcept nogil:
        """Copy out every record of ``src`` still read in place, so its slots
        free now: the sender has asked for credit. (Slots lent out as views
        stay held: their holder decides.)"""
        cdef int64_t i
        cdef IterState* st
        cdef int rc
        for i in range(self.window_mask + 1):
            st = self.window[i]
            if st != NULL and st.held[src]:
                rc = self.copy_out(st, src)
                if rc < 0:
                    return rc
        st = self.held_list
        while st != NULL:
            if st.held[src]:
                rc = self.copy_out(st, src)
                if rc < 0:
                    return rc
            st = st.next_held
        self.release_slots(src)
        return RC_OK

    cdef int copy_out(self, IterState* st, int src) noexcept nogil:
        """Move ``src``'s record of ``st`` out of its ring slot into a piece."""
        cdef char* piece = self.new_piece(st.nbytes[src])
        if piece == NULL:
            return self.fail(RC_NOMEM, 0, NULL, src, 0, st.iteration)
        memcpy(piece, st.data[src], st.nbytes[src])
        self.peers[src].rx_holds[st.held[src] - 1] -= 1
        st.held[src] = 0
        st.data[src] = piece
        self.counters.spilled += 1
        return RC_OK

    cdef void release_hold(self, int src, uint32_t held) noexcept nogil:
        """A record read in place is done with: its slot may be freed."""
        self.peers[src].rx_holds[held - 1] -= 1
        self.release_slots(src)

    cdef void unlist_held(self, IterState* st) noexcept nogil:
        cdef IterState** link = &self.held_list
        while link[0] != NULL:
            if link[0] == st:
                link[0] = st.next_held
                st.next_held = NULL
                return
            link = &link[0].next_held

    cdef void release_state_holds(self, IterState* st) noexcept nogil:
        """Release every slot ``st`` still reads in place (it is assembled)."""
        cdef int s
        self.unlist_held(st)
        for s in range(st.nranks):
            if st.held[s]:
                self.release_hold(s, st.held[s])
                st.held[s] = 0
                st.data[s] = NULL

    cdef int state_for(self, int64_t it, int src, IterState** out) noexcept nogil:
        """The receive state of iteration ``it``, created on first touch."""
        cdef IterState* st = self.window[it & self.window_mask]
        if st == NULL:
            st = self.new_state(it)
            if st == NULL:
                return self.fail(RC_NOMEM, 0, NULL, src, 0, it)
            self.window[it & self.window_mask] = st
        elif st.iteration != it:
            return self.protocol_error(PE_ITERATION_WINDOW, src, it)
        out[0] = st
        return RC_OK

    cdef int deliver(self, IterState* st, int src, const char* payload, size_t n,
                     uint16_t dtype) noexcept nogil:
        """Record ``src``'s message: in place if marked held, else as a copy."""
        if st.have[src]:
            return self.protocol_error(PE_ITERATION_ORDER, src, st.iteration)
        if st.held[src] or src == st.borrowed_src:
            st.data[src] = <char*>payload
        elif n:
            st.data[src] = self.new_piece(n)
            if st.data[src] == NULL:
                return self.fail(RC_NOMEM, 0, NULL, src, 0, st.iteration)
            memcpy(st.data[src], payload, n)
        st.nbytes[src] = n
        st.dtype[src] = dtype
        st.have[src] = 1
        st.total += n
        st.arrived += 1
        if not st.posted:
            self.counters.early_arrivals += 1
        elif st.arrived == st.nranks and st.tx_pending == 0:
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
        elif in_place:
            # Leave the records in their slots: the Request assembles them
            # (one copy) or lends them as views (none).
            st.next_held = self.held_list
            self.held_list = st
            dest = NULL
        elif st.total >= IN_PLACE_BYTES:
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
                elif s != st.borrowed_src and st.data[s] != NULL:
                    self.free_piece(st.data[s], st.nbytes[s])
                st.data[s] = NULL
            st.borrowed_src = -1
        st.out = NULL
        self.window[st.iteration & self.window_mask] = NULL
        st.detached = True
        if st.orphaned:
            self.release_state_holds(st)
            self.drop_state(st)
        return RC_OK
