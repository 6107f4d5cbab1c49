# cython: language_level=3
"""Zeroed memory for large tables read at random, in 2 MiB pages where the OS allows.

Lookups into the hash tables and the accumulator state rows land at random
across hundreds of MB; with 4 KiB pages nearly every one also misses the TLB.
Small tables come from the heap, 64-byte aligned (the state rows start on
cache lines). The only allocator of its kind in the engine.
"""
import numpy as np
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_WRITABLE
from libc.stdlib cimport free
from libc.string cimport memset

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int madvise(void* addr, size_t length, int advice)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MADV_HUGEPAGE
    void* MAP_FAILED

cdef enum:
    HUGE_PAGE = 2 << 20
    HUGE_MIN = 4 * HUGE_PAGE    # below this, the heap
    LINE = 64


cdef void* zeroed_table(size_t nbytes) noexcept nogil:
    """Zeroed memory (NULL if none), free with free_table(p, nbytes).

    Large: a private anonymous mapping, advised to use huge pages, whose pages
    cost memory only once touched (a shared mapping is shmem, which gets no
    transparent huge pages). Small: the heap, aligned to a cache line.
    """
    cdef void* p = NULL
    if nbytes < HUGE_MIN:
        if posix_memalign(&p, LINE, nbytes if nbytes else 1) != 0:
            return NULL
        memset(p, 0, nbytes)
        return p
    p = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if p == MAP_FAILED:
        return NULL
    madvise(p, nbytes, MADV_HUGEPAGE)  # advice only: 4 KiB pages if the kernel declines
    return p


cdef void free_table(void* p, size_t nbytes) noexcept nogil:
    if p == NULL:
        return
    if nbytes < HUGE_MIN:
        free(p)
    else:
        munmap(p, nbytes)


cdef class ZeroedBuffer:
    """A zeroed_table as a writable Python buffer, freed with its last reference."""
    cdef void* p
    cdef size_t nbytes
    cdef Py_ssize_t shape[1]

    def __cinit__(self, size_t nbytes):
        self.nbytes = nbytes
        self.p = zeroed_table(nbytes)
        if self.p == NULL:
            raise MemoryError(f"{nbytes} bytes of table memory")
        self.shape[0] = <Py_ssize_t>nbytes

    def __dealloc__(self):
        free_table(self.p, self.nbytes)

    def __getbuffer__(self, Py_buffer* view, int flags):
        view.buf = self.p
        view.obj = self
        view.len = <Py_ssize_t>self.nbytes
        view.readonly = 0
        view.itemsize = 1
        view.format = NULL
        if flags & PyBUF_FORMAT:
            view.format = b"B"
        view.ndim = 1
        view.shape = self.shape
        view.strides = NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass


def zeroed_int64(Py_ssize_t rows, Py_ssize_t width):
    """A zeroed int64 [rows, width] array in zeroed_table memory, starting on a cache line."""
    return np.frombuffer(ZeroedBuffer(rows * width * 8), dtype=np.int64, count=rows * width).reshape(rows, width)

HUGE_TABLE_BYTES = HUGE_MIN  # from this size on, a table is mapped and advised to use huge pages
