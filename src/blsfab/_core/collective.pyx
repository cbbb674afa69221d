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

    def _flush_chain(self):
        """Post the open chain's iterations together, then wait for the bound."""
        pending, self._chain = self._chain, []
        if pending:
            self._engine.post(pending, self.timeout, self.bound)
