# RingState: what the ring engine owns and the one place its failures become exceptions.

cdef extern from "<pythread.h>":
    unsigned long PyThread_get_thread_ident()

cdef extern from "Python.h" nogil:
    ctypedef struct PyThreadState:
        pass
    PyThreadState* PyEval_SaveThread()
    void PyEval_RestoreThread(PyThreadState* state)


cdef class RingState:
    """The engine's resources and bookkeeping, its error record and its
    broken state. Subclasses add the protocol; nothing here talks to peers.

    Failure model: the nogil layer returns RC_ codes and records the details
    with fail(); check_rc() turns them into exceptions. A failure that may
    have left the protocol state half-changed (a poll error, a protocol error,
    a post interrupted after some of its writes left) breaks the engine: that
    call raises the original error, and every later call raises a BrokenError
    naming it, until close().
    """

    cdef readonly int rank, size
    cdef readonly size_t slot_bytes
    cdef readonly size_t stage_slot_bytes  # one staging slot: slot_bytes, or less with zero-copy
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
    cdef uint32_t spin_mask             # empty polls between yields, minus one
    cdef uint64_t scratch_word
    cdef int nlocal                     # peers on the node-local path
    # Completed iterations whose records are still read in place: the Request
    # assembles them (or lends them as views) and releases the slots. Listed,
    # so a sender blocked on credits can still have them copied out (spill).
    cdef IterState* held_list
    # Freed receive states kept for the next iterations (new_state): a chain
    # creates and frees dozens at a time, more than malloc's per-thread cache
    # keeps, and each then costs a trip through the allocator.
    cdef IterState* spare_states
    cdef int nspare
    # The same for the pieces small records are copied into (new_piece).
    cdef char* spare_pieces[PIECE_CLASSES * SPARE_PIECES]
    cdef int nspare_pieces[PIECE_CLASSES]
    # Zero-copy send: records of at least zero_copy_bytes (0: off) go out from
    # the caller's buffer; tx_zero_copy[i] is the iteration whose write uses
    # tx_ctx[i], until its local completion.
    cdef readonly size_t zero_copy_bytes
    cdef IterState** tx_zero_copy
    cdef TxContext* zero_copy_ctx       # contexts of zero-copy writes only
    cdef int64_t zero_copy_inflight
    cdef int64_t zero_copy_low          # oldest iteration with such a write in flight
    cdef readonly int64_t view_holds    # ring slots held by live views
    # One CQ batch; entries not yet handled survive a failed poll.
    cdef fi_cq_data_entry batch[16]
    cdef fi_addr_t batch_source[16]     # with FI_SOURCE: who wrote each entry
    cdef int batch_next, batch_len
    cdef bint check_source
    # progress="thread": a thread polls between calls; every entry point then
    # holds this mutex, and the thread takes it for one poll at a time.
    cdef pthread_mutex_t mutex
    cdef readonly bint threaded
    cdef bint thread_stop
    cdef int thread_rc                  # the thread's failure, reported by the next call
    cdef object thread
    # A small post keeps the GIL until it has to wait; the wait primitive then
    # releases it here and the post's caller takes it back.
    cdef bint gil_held
    cdef PyThreadState* gil_saved
    # last failure, filled without the GIL
    cdef int err_ret
    cdef const char* err_call
    cdef int err_rank
    cdef int err_kind
    cdef int64_t err_value
    cdef bint fatal                     # the failure left protocol state half-changed
    cdef fi_cq_err_entry err_entry      # an error completion, read where it was found
    cdef char err_text[256]
    cdef object broken                  # the BrokenError every later call raises
    cdef unsigned long owner            # the thread that issues iterations
    cdef bint owned
    cdef unsigned long active_thread    # a thread inside a call without the GIL, or 0
    cdef readonly bint closed
    cdef public double default_timeout
    cdef readonly FabricInfo info

    def __cinit__(self, *args, **kwargs):
        self.peers = NULL
        self.tx_ctx = NULL
        self.window = NULL
        self.gil_saved = NULL
        self.closed = True
        self.default_timeout = 60.0
        self.spin_mask = 31
        pthread_mutex_init(&self.mutex, NULL)

    def __dealloc__(self):
        cdef int r, c
        cdef IterState* st
        if self.peers != NULL:
            for r in range(self.size):
                free(self.peers[r].rx_landed)
                free(self.peers[r].rx_holds)
            free(self.peers)
        free(self.tx_ctx)
        free(self.tx_zero_copy)
        free(self.zero_copy_ctx)
        free(self.window)
        while self.spare_states != NULL:
            st = self.spare_states
            self.spare_states = st.next_spare
            free(st)
        for c in range(PIECE_CLASSES):
            for r in range(self.nspare_pieces[c]):
                free(self.spare_pieces[c * SPARE_PIECES + r])
        pthread_mutex_destroy(&self.mutex)

    # ---- nogil failure record ------------------------------------------------

    cdef int fail(self, int rc, int ret, const char* call, int rank, int kind,
                  int64_t value) noexcept nogil:
        self.err_ret, self.err_call, self.err_rank = ret, call, rank
        self.err_kind, self.err_value = kind, value
        if rc == RC_PROTOCOL or rc == RC_NOMEM:
            self.fatal = True
        return rc

    cdef int protocol_error(self, int kind, int rank, int64_t value) noexcept nogil:
        return self.fail(RC_PROTOCOL, 0, NULL, rank, kind, value)

    # ---- receive states (callers hold the lock) ----------------------------------

    cdef IterState* new_state(self, int64_t iteration) noexcept nogil:
        """An empty receive state, a spare one if any; NULL if out of memory."""
        cdef IterState* st = self.spare_states
        if st == NULL:
            return iter_state_new(iteration, self.size)
        self.spare_states = st.next_spare
        self.nspare -= 1
        iter_state_init(st, iteration, self.size)
        return st

    cdef void drop_state(self, IterState* st) noexcept nogil:
        """Free a state's pieces and keep the state itself as a spare."""
        cdef int s
        for s in range(st.nranks):
            if not st.held[s] and s != st.borrowed_src and st.data[s] != NULL:
                self.free_piece(st.data[s], st.nbytes[s])
                st.data[s] = NULL
        free(st.result)  # all it still owns; iter_state_init clears the pointer
        if self.nspare >= SPARE_STATES:
            free(st)
            return
        st.next_spare = self.spare_states
        self.spare_states = st
        self.nspare += 1

    cdef char* new_piece(self, size_t n) noexcept nogil:
        """Room for a received record of ``n`` bytes; NULL if out of memory.
        Every piece of a receive state comes from here (or piece_alloc), so
        that free_piece() may keep it for reuse; plain free() is always right
        too."""
        cdef int c = piece_class(n)
        if c >= 0 and self.nspare_pieces[c]:
            self.nspare_pieces[c] -= 1
            return self.spare_pieces[c * SPARE_PIECES + self.nspare_pieces[c]]
        return piece_alloc(n)

    cdef void free_piece(self, char* piece, size_t n) noexcept nogil:
        """Give back a piece of new_piece(n)."""
        cdef int c = piece_class(n)
        if c < 0 or self.nspare_pieces[c] == SPARE_PIECES:
            free(piece)
            return
        self.spare_pieces[c * SPARE_PIECES + self.nspare_pieces[c]] = piece
        self.nspare_pieces[c] += 1

    cdef inline bint spares_safe(self) noexcept:
        """May a caller holding the GIL use the spare lists now, from any
        thread? Yes if the lock guards them (progress thread), or if no thread
        is inside a call that released the GIL: one cannot start while we hold
        it. Otherwise (an object dropped on another thread mid-wait) use plain
        malloc and free, which are always right."""
        return self.threaded or self.active_thread == 0

    cdef inline void lock(self) noexcept nogil:
        if self.threaded:
            pthread_mutex_lock(&self.mutex)

    cdef inline void unlock(self) noexcept nogil:
        if self.threaded:
            pthread_mutex_unlock(&self.mutex)

    cdef inline void take_gil_back(self) noexcept:
        """After a nogil-layer call made with the GIL held: reacquire it if
        the wait primitive released it."""
        if self.gil_saved != NULL:
            PyEval_RestoreThread(self.gil_saved)
            self.gil_saved = NULL
        self.gil_held = False

    # ---- exceptions -----------------------------------------------------------

    cdef object error_for(self, int rc, int64_t iteration=-1, str waiting_for="",
                          int64_t need=-1, double timeout=0.0, IterState* st=NULL):
        """The exception for RC_ code ``rc``, from the recorded failure."""
        if rc == RC_TIMEOUT:
            if st != NULL:
                missing = [s for s in range(st.nranks) if not st.have[s]]
                return BlsTimeoutError(
                    f"rank {self.rank}: iteration {iteration} incomplete after {timeout:g} s; "
                    f"no message yet from ranks {missing} (not posted, or stopped)",
                    iteration=iteration, ranks=missing)
            if need >= 0:
                late = [r for r in range(self.size)
                        if r != self.rank and self.peers[r].heard < need]
                return BlsTimeoutError(
                    f"rank {self.rank}: iteration {iteration} waited {timeout:g} s for ranks "
                    f"{late} to post iteration {need - 1} (the bound); they are stopped, "
                    "crashed or far slower; raise timeout= if they are merely slow",
                    iteration=iteration, ranks=late)
            ranks = [self.err_rank] if self.err_rank >= 0 else []
            return BlsTimeoutError(f"rank {self.rank}: timed out {waiting_for or 'waiting'} "
                                   f"for ranks {ranks} (iteration {iteration})",
                                   iteration=iteration, ranks=ranks)
        if rc == RC_FABRIC:
            if self.err_ret == -FI_EAVAIL:
                detail = (f"{fi_error_text(self.err_entry.err)} (err {self.err_entry.err}, "
                          f"provider errno {self.err_entry.prov_errno}: "
                          f"{self.err_text.decode(errors='replace')})")
            else:
                detail = fi_error_text(self.err_ret)
            call = self.err_call.decode() if self.err_call != NULL else "libfabric"
            peer = f" towards rank {self.err_rank}" if self.err_rank >= 0 else ""
            return FabricError(f"rank {self.rank}: {call}{peer} failed on provider "
                               f"{self.provider!r}: {detail}", provider=self.provider,
                               errno=-self.err_ret, strerror=detail)
        if rc == RC_NOMEM:
            return MemoryError(f"rank {self.rank}: out of memory receiving iteration "
                               f"{self.err_value}")
        text = PROTOCOL_ERRORS.get(self.err_kind, "protocol error").format(
            rank=self.err_rank, value=self.err_value)
        return FabricError(f"rank {self.rank}: protocol error: {text} (provider "
                           f"{self.provider!r}); data integrity cannot be guaranteed, close "
                           "this communicator", provider=self.provider)

    cdef int check_rc(self, int rc, int64_t iteration=-1, str waiting_for="",
                      int64_t need=-1, double timeout=0.0, IterState* st=NULL) except -1:
        """Raise the exception for ``rc`` (nothing for RC_OK or a count); break
        the engine first if the failure left its protocol state half-changed."""
        if rc >= RC_OK:
            return 0
        exc = self.error_for(rc, iteration, waiting_for, need, timeout, st)
        if self.fatal:
            self.break_with(exc, iteration)
        raise exc

    @property
    def broken(self):
        """True once a failure has broken the engine (every call then raises
        BrokenError until close())."""
        return self.broken is not None or self.thread_rc < 0

    cdef int break_with(self, object cause, int64_t iteration) except -1:
        if self.broken is None:
            self.broken = BrokenError(
                f"rank {self.rank}: this communicator is broken by an earlier failure in "
                f"iteration {iteration}: {cause}; close() it and create a new one",
                cause=cause, iteration=iteration, provider=self.provider)
        return 0

    cdef int check_not_broken(self) except -1:
        """For results already received: even those are refused once broken."""
        if self.broken is not None:
            raise self.broken
        return 0

    cdef int check_usable(self, bint issuing=True) except -1:
        """Every call starts here: closed, broken, or not this thread's?

        Which thread issues iterations decides how they pair with the
        peers', so the first thread to issue one owns the communicator and
        any other thread's ialltoallv/prepare/post is refused. Waiting and
        polling may come from any thread, one at a time (the torch backend
        completes works from its progress thread under its own lock), but never
        while another thread is inside a call that released the GIL."""
        cdef unsigned long me
        cdef int thread_rc
        if self.closed:
            raise ClosedError("this communicator is closed; create a new blsfab.Communicator")
        self.lock()
        thread_rc = self.thread_rc
        self.unlock()
        if thread_rc < 0 and self.broken is None:
            # The progress thread stopped on this failure; its record is intact.
            self.break_with(self.error_for(thread_rc, self.posted - 1), self.posted - 1)
        if self.broken is not None:
            raise self.broken
        me = PyThread_get_thread_ident()
        if self.active_thread != 0 and self.active_thread != me:
            raise RuntimeError(
                f"rank {self.rank}: thread {me} called this communicator while thread "
                f"{self.active_thread} is inside a call on it; a communicator serves one thread: "
                "give each thread its own with comm.dup()")
        if issuing:
            if not self.owned:
                self.owner, self.owned = me, True
            elif me != self.owner:
                raise RuntimeError(
                    f"rank {self.rank}: this communicator belongs to thread {self.owner}, which "
                    f"issued its iterations, and thread {me} tried to issue one; iterations "
                    "from two threads would pair with the wrong peers' data: give each thread "
                    "its own with comm.dup()")
        return 0

    cdef inline void enter(self):
        """Mark this thread as inside a call that releases the GIL."""
        self.active_thread = PyThread_get_thread_ident()

    cdef inline void leave(self):
        self.active_thread = 0
