# Views: a completed iteration's data, per source, read in place.


cdef class _ViewHold:
    """Keeps one source's bytes alive for as long as any array views them:
    a ring slot (held, so its sender cannot reuse it), a malloc'd piece, or
    (``views(copy_self=False)``) the caller's send buffer.
    It is the arrays' base object, so the buffer export count decides: the
    slot is released only once the last array over it is gone."""

    cdef RingEngine engine
    cdef int src
    cdef uint32_t held          # ring position + 1, or 0
    cdef char* piece            # owned piece (the engine's new_piece), or NULL
    cdef size_t nbytes          # its size, to give it back with free_piece
    cdef object borrowed        # the caller's send buffer, lent as the self part, or None

    def __cinit__(self):
        self.piece = NULL
        self.held = 0

    def __dealloc__(self):
        if self.engine is None:
            free(self.piece)
            return
        self.engine.lock()
        if self.held:
            self.engine.view_holds -= 1
            if not self.engine.closed:
                self.engine.release_hold(self.src, self.held)
        if self.piece != NULL:
            # Back to the engine's spares (it outlives us: we hold a reference).
            if self.engine.spares_safe():
                self.engine.free_piece(self.piece, self.nbytes)
            else:
                free(self.piece)
        self.engine.unlock()


cdef object view_array(bint is_torch, object dtype, int typenum, char* data, size_t nbytes,
                       size_t itemsize, object base):
    """A 1-D array (read-only) or tensor over ``nbytes`` at ``data``, kept alive by ``base``."""
    if nbytes == 0:
        empty = allocate_like(is_torch, dtype, typenum, 0, &data)
        if not is_torch:
            empty.flags.writeable = False
        return empty
    return wrap_memory(is_torch, dtype, typenum, data, nbytes, itemsize, base, False)


cdef class Views:
    """Per-source read-only views of one iteration's data, in rank order,
    returned by Request.views(). Use it as ``with req.views() as parts:`` or
    call ``release()``. Records read in place keep their ring slots until the
    last array over them is gone, even after release(): a slot is never
    recycled under a live view. Held slots hold credits: a sender that runs
    out of them waits, and after the timeout raises blsfab.TimeoutError
    naming this rank; release views before running ``bound`` iterations on."""

    cdef list parts

    def __len__(self):
        return len(self.parts) if self.parts is not None else 0

    def __getitem__(self, i):
        if self.parts is None:
            raise ValueError("these views were released")
        return self.parts[i]

    def __iter__(self):
        if self.parts is None:
            raise ValueError("these views were released")
        return iter(self.parts)

    def __enter__(self):
        if self.parts is None:
            raise ValueError("these views were released")
        return self.parts

    def __exit__(self, *exc):
        self.release()

    def release(self):
        """Drop these views. Ring slots are freed once no array still uses them."""
        self.parts = None

    def __repr__(self):
        state = "released" if self.parts is None else f"{len(self.parts)} sources"
        return f"<blsfab.Views {state}>"
