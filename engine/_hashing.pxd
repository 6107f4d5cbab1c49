# Byte strings to dense ids: the claim ids of a call (DUPLICATE_CLAIM) and its
# accumulator keys (one state row per person and policy), two tables over one arena.

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef uint64_t hash_bytes(const uint8_t* p, int64_t n) noexcept nogil
cdef uint64_t hash_seeded(const uint8_t* p, int64_t n, uint64_t seed) noexcept nogil
cdef void hash_strings(const int32_t* offsets, const uint8_t* data, Py_ssize_t n, uint64_t* h) noexcept nogil

cdef enum:
    KEY_INLINE = 19             # key bytes kept in an accumulator-key slot
    # How many rows ahead the interning loops prefetch table slots (one line each).
    PREFETCH_AHEAD = 64

ctypedef struct KeySlot:        # 32 bytes, two to a cache line
    uint64_t hash
    uint32_t entry              # entry id + 1; 0 = empty
    uint8_t length              # min(length, 255)
    uint8_t key[KEY_INLINE]     # the key's first bytes, zero-padded


cdef class Interner:
    """The arena both tables share: entry e's bytes at arena[starts[e]:starts[e + 1]]."""
    cdef uint8_t* arena
    cdef int64_t arena_len
    cdef int64_t arena_cap
    cdef int64_t* starts        # entry -> offset in arena; starts[count] = arena_len
    cdef int64_t count
    cdef int64_t entries_cap
    cdef int64_t table_mask     # the subclass's slot table: open addressing, linear probing, load <= 3/4
    cdef uint64_t* hashes       # scratch: the hashes of a chunk's keys, kept from chunk to chunk
    cdef int64_t hashes_cap

    cdef int64_t append(self, const uint8_t* key, int64_t length) noexcept nogil
    cdef bint full(self) noexcept nogil
    cdef uint64_t* hash_scratch(self, int64_t n) noexcept nogil
    cdef int grow_table(self, int64_t new_size) noexcept nogil


cdef class ClaimIds(Interner):
    """Claim ids, which mostly miss: 8-byte slots, (hash >> 32) << 32 | (entry + 1); 0 empty."""
    cdef uint64_t* ids

    cdef int64_t intern(self, const uint8_t* key, int64_t length, uint64_t h, bint* is_new) noexcept nogil
    cdef void prefetch(self, uint64_t h) noexcept nogil


cdef class AccumulatorKeys(Interner):
    """(policy, person_id) keys, which mostly hit: 32-byte slots with the key's first bytes."""
    cdef KeySlot* keys

    cdef int64_t intern(self, const uint8_t* key, int64_t length, uint64_t h, bint* is_new) noexcept nogil
    cdef int64_t find(self, const uint8_t* key, int64_t length, uint64_t h) noexcept nogil
    cdef void prefetch(self, uint64_t h) noexcept nogil
    cdef int intern_rows(self, const int32_t* offsets, const uint8_t* data, const int32_t* policy,
                         const int8_t* status, int64_t* out_slot, Py_ssize_t n) noexcept nogil
