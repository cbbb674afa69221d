# Send-buffer inspection and result allocation for numpy arrays and CPU torch tensors.

import sys

cdef object _torch_tensor_type = None


cdef object torch_tensor_type():
    """torch.Tensor if torch is already imported; blsfab never imports it itself."""
    global _torch_tensor_type
    if _torch_tensor_type is None:
        torch = sys.modules.get("torch")
        if torch is not None:
            _torch_tensor_type = torch.Tensor
    return _torch_tensor_type


cdef struct BufferView:
    char* data
    int64_t nelems
    size_t itemsize
    bint is_torch


cdef object describe_buffer(object buf, BufferView* view):
    """Fill ``view`` for a 1-D contiguous CPU numpy array or torch tensor;
    return its dtype."""
    cdef cnp.ndarray arr
    if isinstance(buf, cnp.ndarray):
        arr = <cnp.ndarray>buf
        if cnp.PyArray_NDIM(arr) != 1:
            raise ValueError(f"sendbuf must be 1-D; got {cnp.PyArray_NDIM(arr)} dimensions "
                             f"(shape {buf.shape}); pass buf.reshape(-1)")
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            raise ValueError("sendbuf must be contiguous; got a strided view; "
                             "pass numpy.ascontiguousarray(buf)")
        dtype = <object>cnp.PyArray_DESCR(arr)
        typenum = cnp.PyArray_TYPE(arr)
        if (typenum == cnp.NPY_OBJECT or cnp.PyArray_ITEMSIZE(arr) == 0
                or typenum == cnp.NPY_VOID and dtype.hasobject):
            raise TypeError(f"unsupported sendbuf dtype {arr.dtype}: use a fixed-size "
                            "numeric dtype such as float32, float16 or int64")
        view.data = <char*>cnp.PyArray_DATA(arr)
        view.nelems = cnp.PyArray_SIZE(arr)
        view.itemsize = cnp.PyArray_ITEMSIZE(arr)
        view.is_torch = False
        return dtype
    tensor_type = torch_tensor_type()
    if tensor_type is not None and isinstance(buf, tensor_type):
        if not buf.is_cpu:
            raise ValueError(f"sendbuf must be a CPU tensor; got one on device {buf.device}; "
                             "move it with tensor.cpu()")
        if buf.dim() != 1:
            raise ValueError(f"sendbuf must be 1-D; got {buf.dim()} dimensions "
                             f"(shape {tuple(buf.shape)}); pass tensor.reshape(-1)")
        if not buf.is_contiguous():
            raise ValueError("sendbuf must be contiguous; got a strided tensor; "
                             "pass tensor.contiguous()")
        if buf.is_quantized or buf.is_sparse:
            raise TypeError(f"unsupported sendbuf: quantized and sparse tensors are not "
                            f"plain memory; convert with tensor.dequantize() or .to_dense()")
        view.data = <char*><uintptr_t>buf.data_ptr()
        view.nelems = buf.numel()
        view.itemsize = buf.element_size()
        view.is_torch = True
        return buf.dtype
    raise TypeError(f"sendbuf must be a numpy.ndarray or a CPU torch.Tensor; "
                    f"got {type(buf).__module__}.{type(buf).__qualname__}")


cdef int describe_output(object out, bint is_torch, object dtype, BufferView* view) except -1:
    """Fill ``view`` for a receive buffer given to wait(out=): a C-contiguous,
    writable numpy array or CPU tensor of the sent kind and dtype, any shape."""
    cdef cnp.ndarray arr
    kind = "a CPU torch.Tensor" if is_torch else "a numpy.ndarray"
    if not is_torch and isinstance(out, cnp.ndarray):
        arr = <cnp.ndarray>out
        if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
            raise ValueError("out must be C-contiguous; got a strided array")
        if not cnp.PyArray_ISWRITEABLE(arr):
            raise ValueError("out is read-only; pass a writable array")
        if out.dtype != dtype:
            raise TypeError(f"out has dtype {out.dtype} but the data sent is {dtype}")
        view.data = <char*>cnp.PyArray_DATA(arr)
        view.nelems = cnp.PyArray_SIZE(arr)
        view.itemsize = cnp.PyArray_ITEMSIZE(arr)
        view.is_torch = False
        return 0
    tensor_type = torch_tensor_type()
    if is_torch and tensor_type is not None and isinstance(out, tensor_type):
        if not out.is_cpu:
            raise ValueError(f"out must be a CPU tensor; got one on device {out.device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous; got a strided tensor")
        if out.dtype != dtype:
            raise TypeError(f"out has dtype {out.dtype} but the data sent is {dtype}")
        if out.requires_grad:
            raise ValueError("out requires grad; pass out.detach() (received data is not "
                             "differentiable)")
        view.data = <char*><uintptr_t>out.data_ptr()
        view.nelems = out.numel()
        view.itemsize = out.element_size()
        view.is_torch = True
        return 0
    raise TypeError(f"out must be {kind}, the kind of buffer sent; got "
                    f"{type(out).__module__}.{type(out).__qualname__}")


cdef dict _dtype_codes = {}
_DTYPE_KINDS = {"f": "float", "i": "int", "u": "uint", "c": "complex"}
# The last dtype looked up: a run sends one dtype call after call, and an
# identity test is far cheaper than hashing a numpy dtype.
cdef object _last_dtype = None
cdef uint16_t _last_code = 0


cdef uint16_t dtype_code(object dtype, bint is_torch) except? 0xffff:
    """The wire's name for an element type (wire.h): (kind << 8) | itemsize.
    A numpy dtype and a torch dtype of the same type share a code."""
    global _last_dtype, _last_code
    cdef object code
    if dtype is _last_dtype:
        return _last_code
    code = _dtype_codes.get(dtype)
    if code is None:
        code = _new_dtype_code(dtype, is_torch)
        _dtype_codes[dtype] = code
    _last_dtype, _last_code = dtype, code
    return code


cdef uint16_t _new_dtype_code(object dtype, bint is_torch) except? 0xffff:
    size = dtype.itemsize
    if is_torch:
        if dtype.is_complex:
            kind = "c"
        elif dtype.is_floating_point:
            kind = "B" if str(dtype) == "torch.bfloat16" else "f"
        elif str(dtype) == "torch.bool":
            kind = "b"
        else:
            kind = "u" if str(dtype).startswith("torch.uint") else "i"
    else:
        kind = dtype.kind if dtype.kind in "fiucb" else "V"
    return (ord(kind) << 8) | (size if size < 256 else 0)


def dtype_name(uint16_t code):
    """A readable name for a wire dtype code, e.g. float32."""
    kind, size = chr(code >> 8), code & 0xff
    if kind == "b":
        return "bool"
    if kind == "B":
        return "bfloat16"
    if kind in _DTYPE_KINDS:
        return f"{_DTYPE_KINDS[kind]}{8 * size}"
    return f"raw {size}-byte items" if size else "raw items"


cdef object allocate_like(bint is_torch, object dtype, int typenum, int64_t nelems,
                          char** data):
    """A new 1-D buffer of ``nelems`` elements of the sender's kind and dtype.
    ``typenum`` >= 0 is a builtin numpy type, allocated without a Python call."""
    cdef cnp.ndarray arr
    cdef cnp.npy_intp dims[1]
    if is_torch:
        torch = sys.modules["torch"]
        out = torch.empty(nelems, dtype=dtype)
        data[0] = <char*><uintptr_t>out.data_ptr()
        return out
    if typenum >= 0:
        dims[0] = nelems
        arr = cnp.PyArray_SimpleNew(1, dims, typenum)
    else:
        arr = np.empty(nelems, dtype=dtype)
    data[0] = <char*>cnp.PyArray_DATA(arr)
    return arr


cdef class _Allocation:
    """Owns one malloc'd block, kept alive as the base of the arrays viewing it."""
    cdef void* ptr

    def __dealloc__(self):
        free(self.ptr)


cdef object wrap_memory(bint is_torch, object dtype, int typenum, char* data, size_t nbytes,
                        size_t itemsize, object base, bint writable):
    """A 1-D array or tensor of the sender's kind and dtype over ``nbytes`` at
    ``data``, without copying; ``base`` keeps the memory alive."""
    cdef cnp.npy_intp dims[1]
    cdef cnp.ndarray arr
    if typenum >= 0 and not is_torch:
        dims[0] = nbytes // itemsize
        arr = cnp.PyArray_SimpleNewFromData(1, dims, typenum, data)
    else:
        dims[0] = nbytes
        arr = cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_UINT8, data)
    cnp.set_array_base(arr, base)
    if is_torch:
        return sys.modules["torch"].from_numpy(arr).view(dtype)
    if not writable:
        cnp.PyArray_CLEARFLAGS(arr, cnp.NPY_ARRAY_WRITEABLE)
    return arr if typenum >= 0 else arr.view(dtype)


cdef object adopt_buffer(bint is_torch, object dtype, int typenum, char* data, size_t nbytes,
                         size_t itemsize):
    """Wrap ``data`` (malloc'd, ``nbytes``) as a 1-D array or tensor of the
    sender's kind and dtype, without copying; the result frees it."""
    cdef _Allocation owner = _Allocation.__new__(_Allocation)
    owner.ptr = data
    return wrap_memory(is_torch, dtype, typenum, data, nbytes, itemsize, owner, True)


cdef extern from "<malloc.h>" nogil:
    int mallopt(int param, int value)
    int M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


def tune_malloc(size_t keep_bytes):
    """Keep freed blocks up to ``keep_bytes`` in the heap instead of returning
    them to the kernel. Receive buffers are allocated and freed every
    iteration; without this, every large one is a fresh mmap whose page faults
    cost more than the copy (measured: 1 MiB messages ran 3 to 6 times slower).
    Process-wide, like MPI libraries' memory hooks; BLSFAB_MALLOC_TUNING=0
    turns it off."""
    cdef int limit = <int>min(keep_bytes, 1 << 30)
    return bool(mallopt(M_MMAP_THRESHOLD, min(limit, 32 << 20)) and
                mallopt(M_TRIM_THRESHOLD, limit))
