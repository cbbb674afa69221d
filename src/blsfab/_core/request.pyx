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


cdef class Request:
    """The handle of one nonblocking alltoallv iteration.

    ``test()`` makes progress and reports completion; ``wait()`` returns the
    received data, the messages of all ranks concatenated in rank order, as
    the same kind of buffer (numpy array or CPU tensor) and dtype that was sent.
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
    cdef list _recvcounts
    # send side, held from prepare() until the iteration is posted
    cdef SendItem item
    cdef object sendbuf
    cdef int64_t* counts_displs
    cdef int64_t send_bytes

    def __cinit__(self):
        self.state = NULL
        self.counts_displs = NULL

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
        self.counts_displs = <int64_t*>malloc(2 * size * sizeof(int64_t))
        if self.counts_displs == NULL:
            raise MemoryError()
        # Every count is checked before anything is sent: integral, in
        # [0, slot payload / itemsize]. That bound keeps c * itemsize and the
        # running total far from int64 overflow (size <= BLS_MAX_RANKS).
        read_counts(sendcounts, size, self.counts_displs,
                    <int64_t>((engine.slot_bytes - SLOT_OVERHEAD) // view.itemsize),
                    view.itemsize, engine.slot_bytes)
        for j in range(size):
            self.counts_displs[size + j] = total
            total += self.counts_displs[j]
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
        self.item.counts = self.counts_displs
        self.item.displs = self.counts_displs + size
        self.item.state = self.state
        return self

    cdef void abandon(self):
        """Its post failed before anything left: the receive state stays in
        the engine's window for the retry, and this request is void."""
        self.state = NULL
        self.abandoned = True

    cdef void release_send(self):
        """Forget the send buffer once its data is copied out."""
        self.sendbuf = None
        free(self.counts_displs)
        self.counts_displs = NULL
        self.item.counts = NULL
        self.item.displs = NULL

    def __dealloc__(self):
        free(self.counts_displs)
        if self.state != NULL:
            if self.engine is not None:
                self.engine.lock()
            if self.state.detached:
                iter_state_free(self.state)
            else:
                self.state.orphaned = True  # the engine frees it on completion
            if self.engine is not None:
                self.engine.unlock()
            self.state = NULL

    cdef int finish(self) except -1:
        """Build the result from the per-source pieces and free them."""
        cdef IterState* st = self.state
        cdef char* out = NULL
        cdef size_t offset = 0
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
        if st.result != NULL:
            # Assembled by the engine at completion: adopt it, no copy.
            result = adopt_buffer(self.is_torch, self.dtype, self.typenum, st.result, st.total,
                                  self.itemsize)
            st.result = NULL
        else:
            result = allocate_like(self.is_torch, self.dtype, self.typenum,
                                   st.total // self.itemsize, &out)
            for s in range(st.nranks):
                if st.nbytes[s]:
                    memcpy(out + offset, st.data[s], st.nbytes[s])
                    offset += st.nbytes[s]
        self._recvcounts = [st.nbytes[s] // self.itemsize for s in range(st.nranks)]
        self.result = result
        iter_state_free(st)
        self.state = NULL
        return 0

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
        if self.result is not None:
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

    def wait(self, timeout=None):
        """Progress until complete and return the received data. Raises
        blsfab.TimeoutError naming the ranks not heard from after ``timeout``
        seconds (default: the communicator's timeout)."""
        cdef int rc
        cdef double deadline
        cdef double limit
        if self.result is not None:
            return self.result
        self.check_usable()
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
        self.finish()
        return self.result

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
        if self._recvcounts is None:
            raise RuntimeError(f"iteration {self.iteration} is not complete yet; "
                               "call test() or wait() first")
        return list(self._recvcounts)

    @property
    def done(self):
        return self.result is not None

    def __repr__(self):
        state = "complete" if self.result is not None else "pending"
        return f"<blsfab.Request iteration={self.iteration} {state}>"
