# cython: language_level=3, cdivision=True, nonecheck=False, embedsignature=True
"""Byte strings to dense ids 0, 1, 2, ... in first-seen order (at most 2^32 - 2), exactly.

Claim ids (DUPLICATE_CLAIM over a whole call) and accumulator keys (one state
row per person and policy) are interned across chunks, each in a table shaped
for how it is looked up, over one arena type (`Interner`) that keeps the bytes.
No hash is trusted without comparing the bytes.
"""
import numpy as np
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memcmp, memset

from ._memory cimport zeroed_table, free_table

cdef extern from *:
    """
    #define MEDSETTLE_MAX_ENTRIES 0xFFFFFFFELL
    #define medsettle_prefetch(p) __builtin_prefetch(p)
    """
    const int64_t MAX_ENTRIES "MEDSETTLE_MAX_ENTRIES"      # slots keep id + 1 in 32 bits
    void prefetch_address "medsettle_prefetch"(const void* p) noexcept nogil


cdef inline int64_t i64min(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b


cdef inline int64_t i64max(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef inline uint64_t load_word(const uint8_t* p, int64_t n) noexcept nogil:
    """Up to 8 bytes as a little word, zero-padded (memcpy: no unaligned or overlong read)."""
    cdef uint64_t w = 0
    memcpy(&w, p, n)
    return w


cdef inline uint64_t mix_finish(uint64_t h) noexcept nogil:
    # murmur3's fmix64, so that the table's low bits are well mixed
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return h


cdef uint64_t hash_seeded(const uint8_t* p, int64_t n, uint64_t seed) noexcept nogil:
    """A word-at-a-time multiply-rotate hash: 8 bytes per step instead of FNV's one.

    Speed matters (two hashes per claim); quality need only spread ids over
    the table, because every hit is confirmed by comparing the bytes.
    """
    cdef uint64_t h = seed ^ (<uint64_t>n * 0x9e3779b97f4a7c15ULL)
    cdef uint64_t w
    while n >= 8:
        w = load_word(p, 8) * 0x87c37b91114253d5ULL
        w = (w << 31) | (w >> 33)
        h ^= w * 0x4cf5ad432745937fULL
        h = ((h << 27) | (h >> 37)) * 5 + 0x52dce729
        p += 8
        n -= 8
    if n > 0:
        w = load_word(p, n) * 0x87c37b91114253d5ULL
        w = (w << 31) | (w >> 33)
        h ^= w * 0x4cf5ad432745937fULL
    return mix_finish(h)


cdef uint64_t hash_bytes(const uint8_t* p, int64_t n) noexcept nogil:
    """The claim-id table's hash of a byte string."""
    return hash_seeded(p, n, 0)


cdef void hash_strings(const int32_t* offsets, const uint8_t* data, Py_ssize_t n, uint64_t* h) noexcept nogil:
    """hash_bytes of each of n strings, in one pass before the probes, so that these can
    prefetch the slots of the strings ahead."""
    cdef Py_ssize_t i
    for i in range(n):
        h[i] = hash_bytes(data + offsets[i], offsets[i + 1] - offsets[i])


cdef inline uint64_t key_hash(const uint8_t* person, int64_t length, int32_t policy) noexcept nogil:
    """The hash of an accumulator key (policy, person id), seeded by the policy."""
    return hash_seeded(person, length, <uint64_t>(<uint32_t>policy) * 0xd6e8feb86659fd93ULL + 1)


cdef inline uint8_t* key_bytes(uint8_t* buf, int64_t* cap, int32_t policy, const uint8_t* person,
                               int64_t length) noexcept nogil:
    """An accumulator key's bytes (4 of policy, then the person id) in `buf`, grown to fit
    (*cap its size); the buffer to use from now on, NULL if it could not grow (buf still
    owned by the caller then)."""
    cdef void* p
    if length + 4 > cap[0]:
        p = realloc(buf, (length + 4) * 2)
        if p == NULL:
            return NULL
        cap[0] = (length + 4) * 2
        buf = <uint8_t*> p
    memcpy(buf, &policy, 4)
    if length:
        memcpy(buf + 4, person, length)
    return buf


cdef inline KeySlot* probe_keys(KeySlot* keys, int64_t mask, const uint8_t* arena, const int64_t* starts,
                                 const uint8_t* key, int64_t length, uint64_t h, const uint8_t* padded,
                                 int64_t* entry) noexcept nogil:
    """The accumulator-key table's probe: the slot holding `key` (*entry its id) or the empty
    slot where it would go (*entry = -1). `padded` is the key's first KEY_INLINE bytes,
    zero-padded; a longer key is compared in full in the arena."""
    cdef int64_t j = <int64_t>(h & <uint64_t>mask)
    cdef int64_t e
    cdef uint8_t short_length = <uint8_t>i64min(length, 255)
    cdef KeySlot* slot
    while True:
        slot = &keys[j]
        if slot.entry == 0:
            entry[0] = -1
            return slot
        if slot.hash == h and slot.length == short_length and memcmp(slot.key, padded, KEY_INLINE) == 0:
            e = <int64_t>slot.entry - 1
            if length <= KEY_INLINE or (starts[e + 1] - starts[e] == length
                                        and memcmp(arena + starts[e], key, length) == 0):
                entry[0] = e
                return slot
        j = (j + 1) & mask


cdef class Interner:
    """The bytes of interned keys and their dense ids; the slot tables are the subclasses'."""

    def __cinit__(self, *args, **kwargs):
        self.arena_cap = 1 << 16
        self.arena = <uint8_t*> malloc(self.arena_cap)
        self.entries_cap = 1 << 12
        self.starts = <int64_t*> malloc((self.entries_cap + 1) * sizeof(int64_t))
        self.table_mask = (1 << 13) - 1
        self.hashes = NULL
        self.hashes_cap = 0
        if not (self.arena and self.starts):
            raise MemoryError()
        self.arena_len = 0
        self.count = 0
        self.starts[0] = 0

    def __dealloc__(self):
        free(self.arena)
        free(self.starts)
        free(self.hashes)

    def __len__(self):
        return self.count

    cdef bint full(self) noexcept nogil:
        """Whether the slot table must grow before the load passes 3/4."""
        return self.count * 4 > (self.table_mask + 1) * 3

    cdef int grow_table(self, int64_t new_size) noexcept nogil:
        """Rehash the subclass's slots into a table of new_size; -1 if memory ran out."""
        return -1

    cdef int64_t append(self, const uint8_t* key, int64_t length) noexcept nogil:
        """Add key as the next entry and return its id; -1 if memory or ids ran out."""
        cdef void* p
        cdef int64_t e
        if self.count >= MAX_ENTRIES:
            return -1
        if self.count + 1 > self.entries_cap:
            p = realloc(self.starts, (self.entries_cap * 2 + 1) * sizeof(int64_t))
            if p == NULL:
                return -1
            self.starts = <int64_t*> p
            self.entries_cap *= 2
        if self.arena_len + length > self.arena_cap:
            while self.arena_len + length > self.arena_cap:
                self.arena_cap *= 2
            p = realloc(self.arena, self.arena_cap)
            if p == NULL:
                return -1
            self.arena = <uint8_t*> p
        memcpy(self.arena + self.arena_len, key, length)
        self.arena_len += length
        e = self.count
        self.count += 1
        self.starts[self.count] = self.arena_len
        return e

    cdef uint64_t* hash_scratch(self, int64_t n) noexcept nogil:
        """Room for n hashes, reused by every chunk (NULL if memory ran out).

        A fresh array per chunk would be fresh pages per chunk: faulting them
        in cost more than hashing the keys.
        """
        cdef void* p
        if n > self.hashes_cap:
            p = realloc(self.hashes, n * sizeof(uint64_t))
            if p == NULL:
                return NULL
            self.hashes = <uint64_t*> p
            self.hashes_cap = n
        return self.hashes

    def reserve(self, int64_t entries, int64_t nbytes):
        """Room for `entries` more keys of `nbytes` in all, so a chunk grows each table at most once.

        Arrays grow at least by half, so a call fed chunk after chunk copies
        its keys a bounded number of times; a caller that knows the call's
        size (a file's row count) reserves it all up front and never rehashes.
        """
        cdef int64_t need = self.count + entries, size = self.table_mask + 1, cap
        cdef void* p
        while need * 4 > size * 3:
            size *= 2
        if size > self.table_mask + 1 and self.grow_table(size) != 0:
            raise MemoryError()
        if need > self.entries_cap:
            cap = i64max(need, self.entries_cap + self.entries_cap // 2)
            p = realloc(self.starts, (cap + 1) * sizeof(int64_t))
            if p == NULL:
                raise MemoryError()
            self.starts = <int64_t*> p
            self.entries_cap = cap
        if self.arena_len + nbytes > self.arena_cap:
            cap = i64max(self.arena_len + nbytes, self.arena_cap + self.arena_cap // 2)
            p = realloc(self.arena, cap)
            if p == NULL:
                raise MemoryError()
            self.arena = <uint8_t*> p
            self.arena_cap = cap

    def export(self):
        """(starts int64[count + 1], arena uint8[...]) copies, for building output columns."""
        starts = np.empty(self.count + 1, dtype=np.int64)
        arena = np.empty(max(self.arena_len, 1), dtype=np.uint8)
        cdef int64_t[::1] sv = starts
        cdef uint8_t[::1] av = arena
        memcpy(&sv[0], self.starts, (self.count + 1) * sizeof(int64_t))
        if self.arena_len:
            memcpy(&av[0], self.arena, self.arena_len)
        return starts, arena[: self.arena_len]


cdef class ClaimIds(Interner):
    """The claim ids of a call. Most are new, so a probe reads one 8-byte word (half the
    hash beside the id) and a new id costs no compare."""

    def __cinit__(self, *args, **kwargs):
        self.ids = <uint64_t*> zeroed_table((self.table_mask + 1) * sizeof(uint64_t))
        if self.ids == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free_table(self.ids, (self.table_mask + 1) * sizeof(uint64_t))

    cdef int grow_table(self, int64_t new_size) noexcept nogil:
        """Rehash by hashing the ids again from the arena (a slot keeps half the hash)."""
        cdef int64_t e, j, mask = new_size - 1
        cdef uint64_t h
        cdef uint64_t* ids = <uint64_t*> zeroed_table(new_size * sizeof(uint64_t))
        if ids == NULL:
            return -1
        for e in range(self.count):
            h = hash_bytes(self.arena + self.starts[e], self.starts[e + 1] - self.starts[e])
            j = <int64_t>(h & <uint64_t>mask)
            while ids[j] != 0:
                j = (j + 1) & mask
            ids[j] = ((h >> 32) << 32) | <uint64_t>(e + 1)
        free_table(self.ids, (self.table_mask + 1) * sizeof(uint64_t))
        self.ids = ids
        self.table_mask = mask
        return 0

    cdef void prefetch(self, uint64_t h) noexcept nogil:
        prefetch_address(&self.ids[<int64_t>(h & <uint64_t>self.table_mask)])

    cdef int64_t intern(self, const uint8_t* key, int64_t length, uint64_t h, bint* is_new) noexcept nogil:
        """The id of `key` (whose hash_bytes is h), adding it if new; -1 if memory or ids ran out."""
        cdef int64_t j = <int64_t>(h & <uint64_t>self.table_mask)
        cdef int64_t e, s
        cdef uint64_t v, tag = h >> 32
        while True:
            v = self.ids[j]
            if v == 0:
                break
            if (v >> 32) == tag:
                e = <int64_t>(v & 0xFFFFFFFFULL) - 1
                s = self.starts[e]
                if self.starts[e + 1] - s == length and memcmp(self.arena + s, key, length) == 0:
                    is_new[0] = False
                    return e
            j = (j + 1) & self.table_mask
        e = self.append(key, length)
        if e < 0:
            return -1
        self.ids[j] = (tag << 32) | <uint64_t>(e + 1)
        is_new[0] = True
        if self.full() and self.grow_table((self.table_mask + 1) * 2) != 0:
            return -1
        return e

    def intern_ids(self, const int32_t[::1] offsets, const uint8_t[::1] data, int64_t[::1] out):
        """Intern byte strings (claim ids) and write their ids, as check_rows does between its
        status checks (which is why that loop is not this one): for tests of the table.
        Raises MemoryError, whichever row the table ran out at."""
        cdef Py_ssize_t n = out.shape[0], i
        cdef bint is_new
        cdef bint failed = False
        cdef uint64_t* h = self.hash_scratch(n + 1)
        if h == NULL:
            raise MemoryError()
        if n == 0:
            return
        with nogil:
            hash_strings(&offsets[0], &data[0], n, h)
            for i in range(n):
                if i + PREFETCH_AHEAD < n:
                    self.prefetch(h[i + PREFETCH_AHEAD])
                out[i] = self.intern(&data[0] + offsets[i], offsets[i + 1] - offsets[i], h[i], &is_new)
                if out[i] < 0:
                    failed = True
                    break
        if failed:
            raise MemoryError(f"claim id table: full at row {i}")


    def intern_spans(self, const int64_t[::1] starts, int64_t skip, const uint8_t[::1] data, int64_t[::1] out):
        """Intern data[starts[i] + skip:starts[i + 1]] for each i, as intern_ids does strings: the
        person ids of an arena of accumulator keys (skip 4, their policy index), read in place."""
        cdef Py_ssize_t n = out.shape[0], i
        cdef int64_t a, length
        cdef bint is_new
        cdef bint failed = False
        cdef uint64_t* h = self.hash_scratch(n + 1)
        if h == NULL:
            raise MemoryError()
        if starts.shape[0] != n + 1:
            raise ValueError("intern_spans: starts must have one more entry than out")
        if n == 0:
            return
        if skip < 0 or starts[n] > data.shape[0]:
            raise ValueError("intern_spans: spans outside the data")
        for i in range(n):
            if starts[i] + skip > starts[i + 1]:
                raise ValueError(f"intern_spans: span {i} is shorter than {skip} bytes")
        with nogil:
            for i in range(n):
                a = starts[i] + skip
                h[i] = hash_bytes(&data[0] + a, starts[i + 1] - a)
            for i in range(n):
                if i + PREFETCH_AHEAD < n:
                    self.prefetch(h[i + PREFETCH_AHEAD])
                a = starts[i] + skip
                length = starts[i + 1] - a
                out[i] = self.intern(&data[0] + a, length, h[i], &is_new)
                if out[i] < 0:
                    failed = True
                    break
        if failed:
            raise MemoryError(f"claim id table: full at row {i}")


cdef class AccumulatorKeys(Interner):
    """Accumulator keys: 4 bytes of policy index, then the person_id bytes. Most are seen
    before, so a slot is 32 bytes with the key's first bytes in it: confirming a hit on a
    short key reads one cache line and no arena."""

    def __cinit__(self, *args, **kwargs):
        self.keys = <KeySlot*> zeroed_table((self.table_mask + 1) * sizeof(KeySlot))
        if self.keys == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free_table(self.keys, (self.table_mask + 1) * sizeof(KeySlot))

    def key_policies(self, int64_t first, int32_t[::1] out):
        """out[i] = the policy index of key first + i (its first 4 bytes, native int32), read in
        place: the summary's persons per policy, without a copy of the arena or a gather."""
        cdef int64_t i, n = out.shape[0]
        if first < 0 or first + n > self.count:
            raise ValueError(f"key_policies: keys {first}..{first + n} outside the {self.count} keys")
        with nogil:
            for i in range(n):
                memcpy(&out[i], self.arena + self.starts[first + i], 4)

    cdef int grow_table(self, int64_t new_size) noexcept nogil:
        """Rehash by the hash each slot keeps."""
        cdef int64_t i, j, mask = new_size - 1
        cdef KeySlot* keys = <KeySlot*> zeroed_table(new_size * sizeof(KeySlot))
        if keys == NULL:
            return -1
        for i in range(self.table_mask + 1):
            if self.keys[i].entry == 0:
                continue
            j = <int64_t>(self.keys[i].hash & <uint64_t>mask)
            while keys[j].entry != 0:
                j = (j + 1) & mask
            keys[j] = self.keys[i]
        free_table(self.keys, (self.table_mask + 1) * sizeof(KeySlot))
        self.keys = keys
        self.table_mask = mask
        return 0

    cdef void prefetch(self, uint64_t h) noexcept nogil:
        prefetch_address(&self.keys[<int64_t>(h & <uint64_t>self.table_mask)])

    cdef int64_t intern(self, const uint8_t* key, int64_t length, uint64_t h, bint* is_new) noexcept nogil:
        """The id of `key` (whose hash is h), adding it if new; -1 if memory or ids ran out."""
        cdef int64_t e
        cdef uint8_t padded[KEY_INLINE]
        cdef uint8_t short_length = <uint8_t>i64min(length, 255)
        cdef KeySlot* slot
        memset(padded, 0, KEY_INLINE)
        memcpy(padded, key, i64min(length, KEY_INLINE))
        slot = probe_keys(self.keys, self.table_mask, self.arena, self.starts, key, length, h, padded, &e)
        if e >= 0:
            is_new[0] = False
            return e
        e = self.append(key, length)
        if e < 0:
            return -1
        slot.hash = h
        slot.entry = <uint32_t>(e + 1)
        slot.length = short_length
        memcpy(slot.key, padded, KEY_INLINE)
        is_new[0] = True
        if self.full() and self.grow_table((self.table_mask + 1) * 2) != 0:
            return -1
        return e

    cdef int intern_rows(self, const int32_t* offsets, const uint8_t* data, const int32_t* policy,
                         const int8_t* status, int64_t* out_slot, Py_ssize_t n) noexcept nogil:
        """Slot of each row's key, -1 for rows with policy < 0 or a status (status may be NULL);
        returns -1 if memory or ids ran out.

        Hashes are computed first in one sequential pass so the probing pass can
        prefetch the table slots of the rows ahead.
        """
        cdef Py_ssize_t i
        cdef int64_t start, length, cap = 256
        cdef uint8_t* buf = <uint8_t*> malloc(cap)
        cdef uint64_t* h = self.hash_scratch(n + 1)
        cdef uint8_t* grown
        cdef bint is_new
        cdef int err = 0
        if buf == NULL or h == NULL:
            free(buf)
            return -1
        for i in range(n):
            h[i] = key_hash(data + offsets[i], offsets[i + 1] - offsets[i], policy[i])
        for i in range(n):
            if i + PREFETCH_AHEAD < n:
                self.prefetch(h[i + PREFETCH_AHEAD])
            if policy[i] < 0 or (status != NULL and status[i] != 0):
                out_slot[i] = -1
                continue
            start = offsets[i]
            length = offsets[i + 1] - start
            grown = key_bytes(buf, &cap, policy[i], data + start, length)
            if grown == NULL:
                err = -1
                break
            buf = grown
            out_slot[i] = self.intern(buf, length + 4, h[i], &is_new)
            if out_slot[i] < 0:
                err = -1
                break
        free(buf)
        return err

    cdef int64_t find(self, const uint8_t* key, int64_t length, uint64_t h) noexcept nogil:
        """The id of `key` (whose hash is h), or -1 when the table does not hold it: intern's
        probe, adding nothing."""
        cdef int64_t e
        cdef uint8_t padded[KEY_INLINE]
        memset(padded, 0, KEY_INLINE)
        memcpy(padded, key, i64min(length, KEY_INLINE))
        probe_keys(self.keys, self.table_mask, self.arena, self.starts, key, length, h, padded, &e)
        return e

    def find_keys(self, const int64_t[::1] offsets, const uint8_t[::1] data, const int32_t[::1] policy,
                  int64_t[::1] out_slot):
        """The slot of each (policy, person_id) key the table holds, -1 for the others (and for
        policy < 0): a lookup of a few keys (the summary's error rows) against the table, which
        hashes nothing of what it holds."""
        cdef Py_ssize_t n = out_slot.shape[0], i
        cdef int64_t start, length, cap = 256
        cdef uint8_t* buf
        cdef uint8_t* grown
        cdef int32_t pol
        cdef bint failed = False
        if offsets.shape[0] != n + 1 or policy.shape[0] != n:
            raise ValueError("find_keys: offsets, policy and out_slot disagree on the rows")
        if n == 0:
            return
        buf = <uint8_t*> malloc(cap)
        if buf == NULL:
            raise MemoryError()
        with nogil:
            for i in range(n):
                pol = policy[i]
                out_slot[i] = -1
                if pol < 0:
                    continue
                start = offsets[i]
                length = offsets[i + 1] - start
                grown = key_bytes(buf, &cap, pol, &data[0] + start, length)
                if grown == NULL:
                    failed = True
                    break
                buf = grown
                out_slot[i] = self.find(buf, length + 4, key_hash(&data[0] + start, length, pol))
        free(buf)
        if failed:
            raise MemoryError()

    def intern_keys(self, const int32_t[::1] offsets, const uint8_t[::1] data,
                    const int32_t[::1] policy, int64_t[::1] out_slot):
        """Intern (policy, person_id) keys for rows with policy >= 0; others get -1."""
        cdef Py_ssize_t n = out_slot.shape[0]
        cdef int err
        if n == 0:
            return
        with nogil:
            err = self.intern_rows(&offsets[0], &data[0], &policy[0], NULL, &out_slot[0], n)
        if err != 0:
            raise MemoryError("accumulator key table")
