# Collective: the per-call path of blsfab.Communicator, compiled.
#
# Communicator (communicator.py) builds the engine and owns the policy; it
# derives from this class so that ialltoallv(), inside a chain or not, is one
# call from Python straight into C: small alltoallvs are issued by the
# thousand, and a Python frame per call was a fifth of their cost.


cdef class Collective:
    """The alltoallv calls of blsfab.Communicator (its base class)."""

    cdef public RingEngine _engine      # None until built, and after a failed build
    cdef public list _chain             # iterations of the open comm.chain(), or None
    cdef public int64_t bound
    cdef public double timeout
    cdef int chain_limit                # a chain is posted once it holds this many

    def _use_engine(self, RingEngine engine not None, int chain_limit):
        """Issue through ``engine`` from now on; post chains of ``chain_limit``."""
        if chain_limit < 1:
            raise ValueError(f"chain_limit={chain_limit} must be at least 1")
        self.chain_limit = chain_limit
        self._engine = engine

    def ialltoallv(self, sendbuf, sendcounts):
        """Post one iteration: ``sendcounts[j]`` elements of ``sendbuf`` go to rank j,
        in rank order. Returns once every peer has posted iteration - bound.
        Send-buffer rule, as in MPI: ``sendbuf`` must stay unchanged until the
        request completes (``wait()`` returned or ``test()`` gave True)."""
        cdef RingEngine engine = self._engine
        cdef Request req
        if engine is None:
            raise ClosedError("this communicator is closed; create a new blsfab.Communicator")
        if self._chain is None:
            return engine.issue(sendbuf, sendcounts, self.bound, self.timeout)
        req = engine.prepare_request(sendbuf, sendcounts)
        self._chain.append(req)
        if len(self._chain) >= self.chain_limit:
            self._flush_chain()
        return req

    def chain(self):
        """Post the alltoallvs issued inside ``with comm.chain():`` together when
        the block ends: their messages to each peer travel packed in one write
        (split over several slots only when they exceed ``slot_bytes``). Each
        Request still completes and returns its own data. Send buffers must
        stay unchanged until their requests complete. If the block raises, the calls
        issued before the exception are still posted, so every Request stays
        valid. Nested chains join the outer one."""
        cdef Chain chain
        if self._engine is None or self._engine.closed:
            raise ClosedError("this communicator is closed; create a new blsfab.Communicator")
        chain = Chain.__new__(Chain)
        chain.comm = self
        return chain

    def _flush_chain(self):
        """Post the open chain's iterations together, then wait for the bound."""
        pending, self._chain = self._chain, []
        if pending:
            self._engine.post(pending, self.timeout, self.bound)


@cython.final
cdef class Chain:
    """The context manager returned by Communicator.chain()."""

    cdef Collective comm
    cdef bint outer             # this block opened the chain (not nested)

    def __enter__(self):
        self.outer = self.comm._chain is None
        if self.outer:
            self.comm._chain = []
        return self.comm

    def __exit__(self, *exc):
        if not self.outer:
            return
        try:
            if self.comm._engine is not None and not self.comm._engine.closed:
                self.comm._flush_chain()
        finally:
            self.comm._chain = None
