# Request: one iteration of alltoallv, from validation to its received data.

cdef extern from "Python.h":
    long long PyLong_AsLongLongAndOverflow(object obj, int* overflow) except? -1


cdef int64_t count_at(object sendcounts, Py_ssize_t j, object value) except? -1:
    """sendcounts[j] as an int64: a Python int (not bool) or a numpy integer;
    floats, strings and the rest are TypeError, values past int64 ValueError."""
    cdef int overflow = 0
    cdef long long v
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"sendcounts[{j}] = {value!r} is a {type(value).__name__}; counts "
                            "must be integers (Python int or a numpy integer array)")
        value = int(value)
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        raise ValueError(f"sendcounts[{j}] = {value} is out of range (0 to 2**63 - 1)")
    return v


cdef cnp.ndarray int64_counts(object counts):
    """A contiguous int64 copy of an integer count vector, or the error."""
    if counts.dtype.kind not in "iu":
        raise TypeError(f"sendcounts has dtype {counts.dtype}; counts must be integers "
                        "(an integer numpy array or a list of int)")
    if counts.ndim != 1:
        raise ValueError(f"sendcounts has shape {counts.shape}; it must be 1-D")
    if counts.dtype.kind == "u" and counts.dtype.itemsize == 8:
        big = np.flatnonzero(counts > np.uint64(2**63 - 1))
        if big.size:
            raise ValueError(f"sendcounts[{big[0]}] = {counts[big[0]]} is out of range "
                             "(0 to 2**63 - 1)")
    return np.ascontiguousarray(counts, dtype=np.int64)


cdef int read_counts(object sendcounts, int size, int64_t* out, int64_t max_count,
                     size_t itemsize, size_t slot_bytes) except -1:
    """Copy ``size`` validated counts into ``out``: each integral and in
    [0, max_count]. The common cases (a list of ints, an int64 array) take
    no per-element Python call beyond the list read."""
    cdef Py_ssize_t j
    cdef int64_t c
    cdef cnp.ndarray arr
    cdef const int64_t* data
    if cnp.PyArray_Check(sendcounts):
        arr = <cnp.ndarray>sendcounts
        if not (cnp.PyArray_TYPE(arr) == cnp.NPY_INT64 and cnp.PyArray_NDIM(arr) == 1
                and cnp.PyArray_ISCARRAY_RO(arr)):
            arr = int64_counts(arr)   # anything but a plain int64 vector: check, convert
        data = <const int64_t*>cnp.PyArray_DATA(arr)
        for j in range(size):
            out[j] = data[j]
    elif type(sendcounts) is list:
        for j in range(size):
            out[j] = count_at(sendcounts, j, (<list>sendcounts)[j])
    else:
        for j in range(size):
            out[j] = count_at(sendcounts, j, sendcounts[j])
    for j in range(size):
        c = out[j]
        if c < 0:
            raise ValueError(f"sendcounts[{j}] = {c} is negative")
        if c > max_count:
            nbytes = c * <object>itemsize   # Python arithmetic: never wraps
            raise ValueError(
                f"sendcounts[{j}] = {c}: the message to rank {j} is {nbytes} bytes but "
                f"slot_bytes={slot_bytes} holds at most {slot_bytes - SLOT_OVERHEAD}; "
                f"create the Communicator with slot_bytes >= {nbytes + SLOT_OVERHEAD}")
    return 0


# Communicators of up to this many ranks keep a request's counts inside it.
cdef enum:
    INLINE_RANKS = 8


@cython.freelist(128)  # a chain holds up to 64 requests; reuse them, not malloc
cdef class Request:
    """The handle of one nonblocking alltoallv iteration.

    ``test()`` makes progress and reports completion; ``wait()`` returns the
    received data, the messages of all ranks concatenated in rank order, as
    the same kind of buffer (numpy array or CPU tensor) and dtype that was sent;
    ``wait(out=buf)`` writes it into ``buf`` instead.

    Send-buffer rule, as in MPI: the send buffer must stay unchanged until the
    request completes (its own part is copied straight from it into the
    result). Once the request is complete, changing it changes nothing anyone
    received.
    """

    cdef RingEngine engine
    cdef IterState* state
    cdef readonly int64_t iteration
    cdef bint is_torch
    cdef object dtype
    cdef int typenum            # builtin numpy type number, or -1
    cdef uint16_t dtype_code    # the element type as the wire names it
    cdef bint abandoned         # its post failed before anything left
    cdef size_t itemsize
    cdef object result
    cdef object out_ref         # the buffer of wait(out=) while the engine may write it
    cdef bint views_taken       # the data went out as views()
    cdef bint received          # counts[:size] are the element counts received
    # send side, held from prepare() until the iteration is posted
    cdef SendItem item
    cdef object sendbuf
    cdef int64_t send_bytes
    # Send counts, then displacements (2 * size), until posted; once complete,
    # counts[:size] holds the elements received from each rank instead.
    cdef int64_t* counts
    cdef int64_t inline_counts[2 * INLINE_RANKS]

    def __cinit__(self):
        self.state = NULL
        self.counts = NULL

    @staticmethod
    cdef Request _create(RingEngine engine, object sendbuf, object sendcounts):
        cdef Request self = Request.__new__(Request)
        cdef BufferView view
        cdef int size = engine.size
        cdef int j
        cdef int64_t total = 0
        cdef Py_ssize_t nsend
        cdef int typenum
        self.dtype = describe_buffer(sendbuf, &view)
        try:
            nsend = len(sendcounts)
        except TypeError:
            raise TypeError(f"sendcounts must be a sequence of {size} integers; "
                            f"got {type(sendcounts).__name__}") from None
        if nsend != size:
            raise ValueError(f"sendcounts has {nsend} entries; it needs one per rank ({size})")
        if size <= INLINE_RANKS:
            self.counts = self.inline_counts
        else:
            self.counts = <int64_t*>malloc(2 * size * sizeof(int64_t))
            if self.counts == NULL:
                raise MemoryError()
        # Every count is checked before anything is sent: integral, in
        # [0, slot payload / itemsize]. That bound keeps c * itemsize and the
        # running total far from int64 overflow (size <= BLS_MAX_RANKS).
        read_counts(sendcounts, size, self.counts,
                    <int64_t>((engine.slot_bytes - slot_overhead) // view.itemsize),
                    view.itemsize, engine.slot_bytes)
        for j in range(size):
            self.counts[size + j] = total
            total += self.counts[j]
        if total > view.nelems:
            raise ValueError(f"sendcounts sum to {total} elements but sendbuf holds only "
                             f"{view.nelems}")
        # Only this touches engine state, so only this holds the engine's lock
        # (no Python allocation under it: a collected Request would relock).
        engine.lock()
        cdef int rc = engine.state_for(engine.reserved, -1, &self.state)
        if rc == RC_OK:
            self.iteration = engine.reserved
            engine.reserved += 1
        engine.unlock()
        if rc < 0:
            self.state = NULL
            engine.check_rc(rc, engine.reserved)
        self.engine = engine
        self.is_torch = view.is_torch
        self.typenum = -1
        if not view.is_torch:
            typenum = (<cnp.dtype>self.dtype).type_num
            if typenum < cnp.NPY_OBJECT or typenum == cnp.NPY_FLOAT16:
                self.typenum = typenum  # a plain numeric type
        self.itemsize = view.itemsize
        self.dtype_code = dtype_code(self.dtype, view.is_torch)
        self.sendbuf = sendbuf
        self.send_bytes = total * view.itemsize
        self.item.data = view.data
        self.item.itemsize = view.itemsize
        self.item.dtype = self.dtype_code
        self.item.counts = self.counts
        self.item.displs = self.counts + size
        self.item.state = self.state
        return self

    cdef void abandon(self):
        """Its post failed before anything left: the receive state stays in
        the engine's window for the retry, and this request is void."""
        self.state = NULL
        self.abandoned = True

    cdef void release_send(self):
        """Forget the send counts once posted. The send buffer stays referenced
        until the result is assembled: this rank's own part is read from it then."""
        self.item.counts = NULL
        self.item.displs = NULL

    cdef void note_received(self, IterState* st):
        """Keep the element counts received (recvcounts) in ``counts``."""
        cdef int s
        for s in range(st.nranks):
            self.counts[s] = <int64_t>(st.nbytes[s] // self.itemsize)
        self.received = True

    cdef list received_list(self):
        return [self.counts[s] for s in range(self.engine.size)]

    def __dealloc__(self):
        cdef IterState* st = self.state
        cdef int src
        cdef char* piece
        if self.counts != self.inline_counts:
            free(self.counts)
        if st != NULL:
            if self.engine is not None:
                self.engine.lock()
            if st.detached:
                if self.engine is not None:
                    self.engine.release_state_holds(st)
                if self.engine is not None and self.engine.spares_safe():
                    self.engine.drop_state(st)
                else:
                    iter_state_free(st)
            else:
                if st.tx_pending > 0 and not self.engine.closed:
                    # Our writes still read the send buffer, which dies with us.
                    self.engine.drain_writes(st, monotonic() + self.engine.default_timeout)
                st.out = NULL
                src = st.borrowed_src
                if src >= 0 and st.have[src] and st.nbytes[src]:
                    # The send buffer dies with us; keep what the engine may still read.
                    piece = (self.engine.new_piece(st.nbytes[src]) if self.engine.spares_safe()
                             else piece_alloc(st.nbytes[src]))
                    if piece != NULL:
                        memcpy(piece, st.data[src], st.nbytes[src])
                    st.data[src] = piece
                st.borrowed_src = -1
                st.orphaned = True  # the engine frees it on completion
            if self.engine is not None:
                self.engine.unlock()
            self.state = NULL

    cdef int finish(self, object out=None) except -1:
        """Build the result from the per-source pieces, into ``out`` when given
        (validated by the caller), and free them."""
        cdef IterState* st = self.state
        cdef char* dest = NULL
        cdef size_t offset = 0
        cdef int s
        cdef BufferView view
        self.check_sources()
        if out is not None:
            describe_output(out, self.is_torch, self.dtype, &view)
            if <size_t>view.nelems * view.itemsize != st.total:
                out = None  # still complete the request; report the mismatch below
        if st.filled_out:
            result = out  # assembled there by the engine at completion
        elif st.result != NULL and out is not None:
            # Assembled before ``out`` was known (completed inside test()).
            memcpy(view.data, st.result, st.total)
            result = out
        elif st.result != NULL:
            # Assembled by the engine at completion: adopt it, no copy.
            result = adopt_buffer(self.is_torch, self.dtype, self.typenum, st.result, st.total,
                                  self.itemsize)
            st.result = NULL
        else:
            if out is not None:
                dest, result = view.data, out
            else:
                result = allocate_like(self.is_torch, self.dtype, self.typenum,
                                       st.total // self.itemsize, &dest)
            for s in range(st.nranks):
                if st.nbytes[s]:
                    memcpy(dest + offset, st.data[s], st.nbytes[s])
                    offset += st.nbytes[s]
        self.note_received(st)
        self.result = result
        self.sendbuf = None
        self.out_ref = None
        self.engine.lock()
        # Records read in place are copied now (or were at completion): their
        # slots may go.
        self.engine.release_state_holds(st)
        self.engine.drop_state(st)
        self.engine.unlock()
        self.state = NULL
        return 0

    cdef int check_sources(self) except -1:
        """Every source sent this rank's dtype, in whole elements."""
        cdef IterState* st = self.state
        cdef int s
        for s in range(st.nranks):
            if st.dtype[s] != self.dtype_code:
                raise TypeError(
                    f"iteration {self.iteration}: rank {s} sent {dtype_name(st.dtype[s])} data "
                    f"but this rank uses {dtype_name(self.dtype_code)} (dtype {self.dtype}); "
                    "every rank must send the same dtype")
            if st.nbytes[s] % self.itemsize:
                raise ValueError(
                    f"iteration {self.iteration}: rank {s} sent {st.nbytes[s]} bytes, not a "
                    f"multiple of this rank's item size {self.itemsize}; all ranks must send "
                    "the same dtype")
        return 0

    def views(self, timeout=None, *, copy_self=True):
        """Progress until complete, then return the data as per-source
        read-only views (blsfab.Views), without assembling it: records read
        in place stay in their ring slots. Use ``with req.views() as parts:``
        or call ``release()``; see Views for what holding them does to flow
        control. The request is then done: wait() raises.

        ``copy_self=False``: this rank's own part is a view of ``sendbuf``
        itself, not a copy of it, and the send-buffer rule then lasts as long
        as that view: changing ``sendbuf`` changes the view. (An iteration
        already assembled, because a peer's message arrived and was taken in
        before this rank posted, is returned as slices of that one buffer,
        own part copied, as without the flag.)"""
        cdef IterState* st
        cdef Views views = Views.__new__(Views)
        cdef _ViewHold hold
        cdef int s
        cdef size_t n
        cdef char* data
        if self.views_taken:
            raise RuntimeError(f"iteration {self.iteration}: views() was already called")
        if self.result is None:
            self.check_usable()
            self._wait_detached(timeout)
            st = self.state
            if st.result != NULL or st.filled_out:
                self.finish()  # already assembled: slice the result
            else:
                self.check_sources()
                parts = []
                self.engine.lock()
                self.engine.unlist_held(st)
                for s in range(st.nranks):
                    if st.held[s]:
                        self.engine.view_holds += 1
                self.engine.unlock()
                for s in range(st.nranks):
                    n = st.nbytes[s]
                    hold = _ViewHold.__new__(_ViewHold)
                    hold.engine, hold.src = self.engine, s
                    if st.held[s]:
                        hold.held = st.held[s]
                        st.held[s] = 0
                        data = st.data[s]
                    elif s == st.borrowed_src and not copy_self:
                        # Lent, not copied: the view keeps the send buffer alive.
                        hold.borrowed = self.sendbuf
                        data = st.data[s]
                    elif s == st.borrowed_src:
                        # Our own part, copied once: the send buffer is the caller's.
                        self.engine.lock()
                        hold.piece = self.engine.new_piece(n if n else 1)
                        self.engine.unlock()
                        if hold.piece == NULL:
                            raise MemoryError()
                        hold.nbytes = n if n else 1
                        memcpy(hold.piece, st.data[s], n)
                        data = hold.piece
                    else:
                        hold.piece, hold.nbytes = st.data[s], n
                        data = hold.piece
                    st.data[s] = NULL
                    parts.append(view_array(self.is_torch, self.dtype, self.typenum, data, n,
                                            self.itemsize, hold))
                self.note_received(st)
                st.borrowed_src = -1
                self.engine.lock()
                self.engine.drop_state(st)  # its pieces are the views' now
                self.engine.unlock()
                self.state = NULL
                self.sendbuf = None
                self.views_taken = True
                views.parts = parts
                return views
        # The data is one assembled buffer: views are slices of it.
        self.views_taken = True
        parts, offset = [], 0
        for c in self.received_list():
            part = self.result[offset:offset + c]
            if not self.is_torch:
                part.flags.writeable = False
            parts.append(part)
            offset += c
        self.result = None
        views.parts = parts
        return views

    cdef int check_usable(self) except -1:
        if self.result is not None:
            return 0
        if self.state == NULL:
            if self.abandoned:
                raise RuntimeError(f"iteration {self.iteration} was never posted: its post "
                                   "failed before anything was sent; issue it again")
            raise RuntimeError("this request was never set up")
        if self.state.closed:
            raise ClosedError(f"the communicator was closed before iteration "
                              f"{self.iteration} completed")
        if not self.state.posted:
            raise RuntimeError(f"iteration {self.iteration} has not been posted yet "
                               "(it is inside an open comm.chain() block)")
        return 0

    def test(self):
        """Make progress once; True when the data has arrived from every rank."""
        if self.result is not None or self.views_taken:
            return True
        self.check_usable()
        self.engine.check_not_broken()
        if not self.is_detached():
            self.engine.make_progress()
            if not self.is_detached():
                return False
        self.check_usable()
        self.finish()
        return True

    def wait(self, timeout=None, out=None):
        """Progress until complete and return the received data. Raises
        blsfab.TimeoutError naming the ranks not heard from after ``timeout``
        seconds (default: the communicator's timeout).

        ``out``: a C-contiguous, writable array (or CPU tensor) of the sent
        kind and dtype, holding exactly the elements that arrive; the data is
        assembled straight into it, and ``out`` is returned. A wrong size
        raises ValueError (the request still completes: ``wait()`` then
        returns the data as a new buffer)."""
        cdef int rc
        cdef double deadline
        cdef double limit
        cdef BufferView view
        if self.views_taken:
            raise RuntimeError(f"iteration {self.iteration}: the data was taken as views()")
        if out is not None:
            describe_output(out, self.is_torch, self.dtype, &view)
        if self.result is not None:
            if out is None or out is self.result:
                return self.result
            return self._copy_result_into(out, view)
        self.check_usable()
        if out is not None:
            # Let the engine assemble into ``out`` when the last message lands.
            self.out_ref = out
            self.engine.lock()
            if not self.state.detached:
                self.state.out = view.data
                self.state.out_bytes = <size_t>view.nelems * view.itemsize
            self.engine.unlock()
        try:
            self._wait_detached(timeout)
        finally:
            if self.state != NULL and self.out_ref is not None:
                self.engine.lock()
                self.state.out = NULL  # never written after we return
                self.engine.unlock()
        self.finish(out)
        if out is not None and self.result is not out:
            self._raise_out_size(view)
        return self.result

    cdef object _copy_result_into(self, object out, BufferView view):
        cdef BufferView have
        describe_output(self.result, self.is_torch, self.dtype, &have)
        if view.nelems != have.nelems:
            self._raise_out_size(view)
        memcpy(view.data, have.data, <size_t>have.nelems * have.itemsize)
        return out

    cdef int _raise_out_size(self, BufferView view) except -1:
        raise ValueError(f"out holds {view.nelems} elements but iteration {self.iteration} "
                         f"received {sum(self.received_list())} (recvcounts "
                         f"{self.received_list()}); "
                         "the request is complete: wait() returns the data")

    cdef int _wait_detached(self, timeout) except -1:
        cdef int rc
        cdef double deadline
        cdef double limit
        self.engine.check_not_broken()
        if not self.is_detached():
            self.engine.check_usable(False)
            limit = self.engine.default_timeout if timeout is None else timeout
            deadline = monotonic() + limit
            self.engine.enter()
            with nogil:
                self.engine.lock()
                rc = self.engine.wait_state(self.state, deadline)
                self.engine.unlock()
            self.engine.leave()
            self.engine.check_rc(rc, self.iteration, "", -1, limit, self.state)
            self.check_usable()
        return 0

    cdef bint is_detached(self):
        cdef bint done
        if not self.engine.threaded:
            return self.state.detached
        self.engine.lock()
        done = self.state.detached
        self.engine.unlock()
        return done

    @property
    def recvcounts(self):
        """Elements received from each rank; valid once the request is complete."""
        if not self.received:
            raise RuntimeError(f"iteration {self.iteration} is not complete yet; "
                               "call test() or wait() first")
        return self.received_list()

    @property
    def done(self):
        return self.result is not None or self.views_taken

    def __repr__(self):
        state = "complete" if self.result is not None else "pending"
        return f"<blsfab.Request iteration={self.iteration} {state}>"
