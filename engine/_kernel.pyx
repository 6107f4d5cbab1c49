# cython: language_level=3, cdivision=True, nonecheck=False, embedsignature=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, or on with MEDSETTLE_BOUNDSCHECK=1.
"""The settlement kernel: one pass over a chunk of claims, no Python object per claim.

Three entry points, each running without the GIL over typed memoryviews:
`check_rows` (statuses up to DUPLICATE_CLAIM, claim-id dedup, accumulator
slots), `order_rows` (the spec's (settle_time, claim_id) order) and `settle`
(every layer of every claim, against per-slot accumulator arrays). The
numeric tables come from engine/compile.py; the layout is in _kernel.pxd.
Set MEDSETTLE_BOUNDSCHECK=1 when building to turn bounds checks back on.
"""
import numpy as np
cimport numpy as cnp
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memcmp, memset
from libc.stdint cimport INT64_MAX, int16_t, uint32_t

cnp.import_array()

cdef extern from *:
    """
    #define MEDSETTLE_BP 10000LL
    #define MEDSETTLE_MAX_AMOUNT 1000000000000LL
    #define MEDSETTLE_MAX_COMPLIANT_TOTAL 100000000000000LL
    #define MEDSETTLE_MAX_AGE_ANY (1LL << 62)
    #define MEDSETTLE_ANY_HOLDS ((int64_t)(1ULL << 63))
    #define MEDSETTLE_MAX_ENTRIES 0xFFFFFFFELL
    """
    const int64_t BP "MEDSETTLE_BP"
    const int64_t MAX_AMOUNT "MEDSETTLE_MAX_AMOUNT"                # 10^12 fen per claim amount
    const int64_t MAX_COMPLIANT_TOTAL "MEDSETTLE_MAX_COMPLIANT_TOTAL"  # 10^14 fen per key
    const int64_t MAX_AGE_ANY_C "MEDSETTLE_MAX_AGE_ANY"    # engine/compile.py MAX_AGE_ANY
    const int64_t ANY_HOLDS_C "MEDSETTLE_ANY_HOLDS"        # engine/compile.py ANY_HOLDS
    const int64_t MAX_ENTRIES "MEDSETTLE_MAX_ENTRIES"      # ids of an Interner: slots keep id + 1 in 32 bits

cdef enum:
    ACC_FIELDS_C = 3  # position, paid, deductible_charged per accumulator column
    STATE_HEAD_C = 2  # admissions, compliant_total before the columns of a state row

ACC_FIELDS = ACC_FIELDS_C
STATE_HEAD = STATE_HEAD_C
PROFILE_SHAPE = (PROFILE_LEVELS, PROFILE_LOCALITIES)
TRACE_NFIELDS = TR_NFIELDS
MAX_AGE_ANY = MAX_AGE_ANY_C
ANY_HOLDS = ANY_HOLDS_C


cdef inline int64_t round_div(int64_t n, int64_t d) noexcept nogil:
    """Half-up rounding of n / d for n >= 0 (spec section 1)."""
    return (n + d // 2) // d


cdef inline int64_t clamp_ratio(int64_t r) noexcept nogil:
    if r < 0:
        return 0
    if r > BP:
        return BP
    return r


cdef inline int64_t i64min(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b


cdef inline int64_t i64max(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef extern from *:
    """
    #define medsettle_prefetch(p) __builtin_prefetch(p)
    """
    void prefetch_address "medsettle_prefetch"(const void* p) noexcept nogil

# How many claims ahead the loops prefetch: hash-table slots (one line each), and
# accumulator rows (several lines each, so fewer rows in flight: measured at 10M claims,
# 8 to 16 rows ahead settled in 1.0-1.3 s where 64 took 1.4-1.9 s).
cdef enum:
    PREFETCH_AHEAD = 64
    ROW_PREFETCH_AHEAD = 12


cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int madvise(void* addr, size_t length, int advice)
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MADV_HUGEPAGE
    void* MAP_FAILED

cdef enum:
    HUGE_PAGE = 2 << 20
    HUGE_MIN = 4 * HUGE_PAGE    # below this, plain calloc


cdef void* zeroed_table(size_t nbytes) noexcept nogil:
    """Zeroed memory for a large hash table, advised to use 2 MiB pages.

    Lookups land at random across hundreds of MB; with 4 KiB pages nearly
    every one also misses the TLB. Free with free_table(p, nbytes).
    """
    cdef void* p
    if nbytes < HUGE_MIN:
        return calloc(nbytes, 1)
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


cdef inline uint64_t hash_seeded(const uint8_t* p, int64_t n, uint64_t seed) noexcept nogil:
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
    """The interner's hash of a byte string."""
    return hash_seeded(p, n, 0)


cdef inline void hash_strings(const int32_t[::1] offsets, const uint8_t[::1] data, Py_ssize_t n,
                              uint64_t* h) noexcept nogil:
    """hash_bytes of each of n strings, in one pass before the probes, so that these can
    prefetch the slots of the strings ahead."""
    cdef Py_ssize_t i
    for i in range(n):
        h[i] = hash_bytes(&data[0] + offsets[i], offsets[i + 1] - offsets[i])


cdef class Interner:
    """Byte strings to dense ids 0, 1, 2, ... in first-seen order (at most 2^32 - 2).

    Claim ids (DUPLICATE_CLAIM over a whole call) and accumulator keys (one
    slot per person and policy) are both interned here, across chunks, in
    tables shaped for how each is looked up. Claim ids mostly miss: their
    slot is 8 bytes, half the hash beside the id, so a probe reads one word
    and a new id costs no compare. Accumulator keys mostly hit: their slot
    is 32 bytes with the key's first bytes in it, so confirming a hit on a
    short key reads one cache line and no arena.
    """

    def __cinit__(self, bint policy_keys=False):
        """`policy_keys`: keys are 4 bytes of policy index, then a person id (see
        `_intern_keys`); otherwise claim ids, hashed with hash_bytes."""
        self.policy_keys = policy_keys
        self.arena_cap = 1 << 16
        self.arena = <uint8_t*> malloc(self.arena_cap)
        self.entries_cap = 1 << 12
        self.starts = <int64_t*> malloc((self.entries_cap + 1) * sizeof(int64_t))
        self.table_mask = (1 << 13) - 1
        self.ids = NULL
        self.keys = NULL
        if policy_keys:
            self.keys = <KeySlot*> zeroed_table((self.table_mask + 1) * sizeof(KeySlot))
        else:
            self.ids = <uint64_t*> zeroed_table((self.table_mask + 1) * sizeof(uint64_t))
        self.hashes = NULL
        self.hashes_cap = 0
        if not (self.arena and self.starts and (self.ids or self.keys)):
            raise MemoryError()
        self.arena_len = 0
        self.count = 0
        self.starts[0] = 0

    def __dealloc__(self):
        free(self.arena)
        free(self.starts)
        free(self.hashes)
        free_table(self.ids, (self.table_mask + 1) * sizeof(uint64_t))
        free_table(self.keys, (self.table_mask + 1) * sizeof(KeySlot))

    def __len__(self):
        return self.count

    cdef int grow_table(self, int64_t new_size) noexcept nogil:
        """Rehash into a table of new_size slots: key slots by the hash they keep,
        claim ids by hashing them again from the arena (their slot keeps half of it)."""
        cdef int64_t i, j, e, mask = new_size - 1
        cdef uint64_t h
        cdef uint64_t* ids
        cdef KeySlot* keys
        if self.policy_keys:
            keys = <KeySlot*> zeroed_table(new_size * sizeof(KeySlot))
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
        else:
            ids = <uint64_t*> zeroed_table(new_size * sizeof(uint64_t))
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

    cdef void prefetch(self, uint64_t h) noexcept nogil:
        cdef int64_t j = <int64_t>(h & <uint64_t>self.table_mask)
        if self.policy_keys:
            prefetch_address(&self.keys[j])
        else:
            prefetch_address(&self.ids[j])

    cdef int64_t intern(self, const uint8_t* key, int64_t length, uint64_t h, bint* is_new) noexcept nogil:
        """The id of `key` (whose hash is h), adding it if new; -1 if memory or ids ran out."""
        cdef int64_t j = <int64_t>(h & <uint64_t>self.table_mask)
        cdef int64_t e, s
        cdef uint64_t v, tag = h >> 32
        cdef uint8_t padded[KEY_INLINE]
        cdef uint8_t short_length = <uint8_t>i64min(length, 255)
        cdef KeySlot* slot = NULL
        cdef void* p
        if self.policy_keys:
            memset(padded, 0, KEY_INLINE)
            memcpy(padded, key, i64min(length, KEY_INLINE))
            while True:
                slot = &self.keys[j]
                if slot.entry == 0:
                    break
                if slot.hash == h and slot.length == short_length and memcmp(slot.key, padded, KEY_INLINE) == 0:
                    e = <int64_t>slot.entry - 1
                    if length <= KEY_INLINE or (self.starts[e + 1] - self.starts[e] == length
                                                and memcmp(self.arena + self.starts[e], key, length) == 0):
                        is_new[0] = False
                        return e
                j = (j + 1) & self.table_mask
        else:
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
        if self.policy_keys:
            slot.hash = h
            slot.entry = <uint32_t>(e + 1)
            slot.length = short_length
            memcpy(slot.key, padded, KEY_INLINE)
        else:
            self.ids[j] = (tag << 32) | <uint64_t>(e + 1)
        is_new[0] = True
        if self.count * 4 > (self.table_mask + 1) * 3:
            if self.grow_table((self.table_mask + 1) * 2) != 0:
                return -1
        return e

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

    def intern_keys(self, const int32_t[::1] offsets, const uint8_t[::1] data,
                    const int32_t[::1] policy, int64_t[::1] out_slot):
        """Intern (policy, person_id) keys for rows with policy >= 0; others get -1."""
        cdef Py_ssize_t n = out_slot.shape[0]
        cdef int ok
        if not self.policy_keys:
            raise ValueError("intern_keys needs an Interner(policy_keys=True)")
        with nogil:
            ok = _intern_keys(self, offsets, data, policy, NULL, out_slot, n)
        if ok != 0:
            raise MemoryError("accumulator key table")

    def intern_ids(self, const int32_t[::1] offsets, const uint8_t[::1] data, int64_t[::1] out):
        """Intern plain byte strings (claim ids) and write their ids, as check_rows does between
        its status checks (which is why that loop is not this one): for tests of the table."""
        cdef Py_ssize_t n = out.shape[0], i
        cdef bint is_new
        cdef uint64_t* h
        if self.policy_keys:
            raise ValueError("intern_ids needs an Interner(policy_keys=False)")
        h = self.hash_scratch(n + 1)
        if h == NULL:
            raise MemoryError()
        with nogil:
            hash_strings(offsets, data, n, h)
            for i in range(n):
                if i + PREFETCH_AHEAD < n:
                    self.prefetch(h[i + PREFETCH_AHEAD])
                out[i] = self.intern(&data[0] + offsets[i], offsets[i + 1] - offsets[i], h[i], &is_new)
                if out[i] < 0:
                    break
        if n and out[n - 1] < 0:
            raise MemoryError("claim id table")


cdef int _intern_keys(Interner keys, const int32_t[::1] offsets, const uint8_t[::1] data,
                      const int32_t[::1] policy, const int8_t* status,
                      int64_t[::1] out_slot, Py_ssize_t n) noexcept nogil:
    """Slot of each row's accumulator key: 4 bytes of policy index, then the person_id bytes.

    Hashes are computed first in one sequential pass so the probing pass can
    prefetch the table slots of the rows ahead.
    """
    cdef Py_ssize_t i
    cdef int64_t start, length, cap = 256
    cdef uint8_t* buf = <uint8_t*> malloc(cap)
    cdef uint64_t* h = keys.hash_scratch(n + 1)
    cdef void* p
    cdef bint is_new
    cdef int32_t pol
    cdef int err = 0
    if buf == NULL or h == NULL:
        free(buf)
        return -1
    for i in range(n):
        pol = policy[i]
        h[i] = hash_seeded(&data[0] + offsets[i], offsets[i + 1] - offsets[i],
                           <uint64_t>(<uint32_t>pol) * 0xd6e8feb86659fd93ULL + 1)
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            keys.prefetch(h[i + PREFETCH_AHEAD])
        if policy[i] < 0 or (status != NULL and status[i] != OK):
            out_slot[i] = -1
            continue
        start = offsets[i]
        length = offsets[i + 1] - start
        if length + 4 > cap:
            cap = (length + 4) * 2
            p = realloc(buf, cap)
            if p == NULL:
                err = -1
                break
            buf = <uint8_t*> p
        pol = policy[i]
        memcpy(buf, &pol, 4)
        if length:
            memcpy(buf + 4, &data[0] + start, length)
        out_slot[i] = keys.intern(buf, length + 4, h[i], &is_new)
        if out_slot[i] < 0:
            err = -1
            break
    free(buf)
    return err


def check_rows(const int32_t[::1] claim_offsets, const uint8_t[::1] claim_data,
               const uint8_t[::1] claim_valid,
               const int32_t[::1] person_offsets, const uint8_t[::1] person_data,
               const uint8_t[::1] missing, const uint8_t[::1] invalid_enum,
               const int64_t[::1] total, const int64_t[::1] self_funded, const int64_t[::1] over_limit,
               const int64_t[::1] class_b_copay, const int64_t[::1] in_scope,
               const int64_t[::1] in_scope_class_b,
               const int32_t[::1] policy, const int64_t[::1] identity_mask,
               const PolicyRow[::1] policies,
               Interner claim_ids, Interner keys,
               int8_t[::1] status, int64_t[::1] slot):
    """Statuses up to DUPLICATE_CLAIM, in the spec's order of precedence, and key slots.

    Every non-null claim id is interned in input order, so a
    first occurrence that is rejected still makes later ones duplicates.
    """
    cdef Py_ssize_t n = status.shape[0], i
    cdef int err = 0
    cdef int64_t start
    cdef bint is_new, bad_neg, bad_range
    cdef int8_t s
    cdef uint64_t* h
    if claim_ids.policy_keys or not keys.policy_keys:
        raise ValueError("check_rows needs an Interner() of claim ids and an Interner(policy_keys=True)")
    h = claim_ids.hash_scratch(n + 1)
    if h == NULL:
        raise MemoryError()
    with nogil:
        hash_strings(claim_offsets, claim_data, n, h)
        for i in range(n):
            if i + PREFETCH_AHEAD < n:
                claim_ids.prefetch(h[i + PREFETCH_AHEAD])
            s = OK
            if missing[i]:
                s = MISSING_FIELD
            elif invalid_enum[i]:
                s = INVALID_VALUE
            else:
                bad_neg = ((total[i] | self_funded[i] | over_limit[i] | class_b_copay[i] | in_scope[i]
                            | in_scope_class_b[i]) < 0)
                bad_range = (total[i] > MAX_AMOUNT or self_funded[i] > MAX_AMOUNT or over_limit[i] > MAX_AMOUNT
                             or class_b_copay[i] > MAX_AMOUNT or in_scope[i] > MAX_AMOUNT
                             or in_scope_class_b[i] > MAX_AMOUNT)
                if bad_neg:
                    s = INVALID_AMOUNT
                elif bad_range:
                    s = AMOUNT_OUT_OF_RANGE
                elif (total[i] != self_funded[i] + over_limit[i] + class_b_copay[i] + in_scope[i]
                        or in_scope_class_b[i] > in_scope[i]):
                    s = AMOUNT_MISMATCH
                elif policy[i] < 0:
                    s = UNKNOWN_POLICY
                elif identity_mask[i] & ~policies[policy[i]].identity_mask:
                    s = UNKNOWN_IDENTITY
            if claim_valid[i]:
                start = claim_offsets[i]
                if claim_ids.intern(&claim_data[0] + start, claim_offsets[i + 1] - start, h[i], &is_new) < 0:
                    err = 1
                    break
                if not is_new and s == OK:
                    s = DUPLICATE_CLAIM
            status[i] = s
        if err == 0:
            err = _intern_keys(keys, person_offsets, person_data, policy, &status[0] if n else NULL, slot, n)
    if err:
        raise MemoryError("claim id or key table")


cdef inline int id_cmp(const int32_t[::1] off, const uint8_t[::1] data, int64_t a, int64_t b) noexcept nogil:
    cdef int64_t sa = off[a], la = off[a + 1] - off[a]
    cdef int64_t sb = off[b], lb = off[b + 1] - off[b]
    cdef int64_t m = la if la < lb else lb
    cdef int c = 0
    if m > 0:
        c = memcmp(&data[0] + sa, &data[0] + sb, m)
    if c != 0:
        return c
    return (la > lb) - (la < lb)


def order_rows(const int64_t[::1] settle_time, const int32_t[::1] claim_offsets,
               const uint8_t[::1] claim_data):
    """Row order by (settle_time, claim_id as UTF-8 bytes).

    numpy's stable argsort does the times (linear on already ordered input);
    runs of equal times are then merge-sorted by claim id here.
    """
    order_arr = np.argsort(np.asarray(settle_time), kind="stable").astype(np.int64, copy=False)
    cdef int64_t[::1] order = order_arr
    cdef Py_ssize_t n = order.shape[0], i, j, width, lo, mid, hi, a, b, k
    cdef int64_t* tmp
    if n < 2:
        return order_arr
    tmp = <int64_t*> malloc(n * sizeof(int64_t))
    if tmp == NULL:
        raise MemoryError()
    with nogil:
        i = 0
        while i < n:
            j = i + 1
            while j < n and settle_time[order[j]] == settle_time[order[i]]:
                j += 1
            if j - i > 1:
                width = 1
                while width < j - i:
                    lo = i
                    while lo < j:
                        mid = i64min(lo + width, j)
                        hi = i64min(lo + 2 * width, j)
                        a = lo
                        b = mid
                        k = lo
                        while a < mid and b < hi:
                            if id_cmp(claim_offsets, claim_data, order[b], order[a]) < 0:
                                tmp[k] = order[b]
                                b += 1
                            else:
                                tmp[k] = order[a]
                                a += 1
                            k += 1
                        while a < mid:
                            tmp[k] = order[a]
                            a += 1
                            k += 1
                        while b < hi:
                            tmp[k] = order[b]
                            b += 1
                            k += 1
                        lo = hi
                    memcpy(&order[i], &tmp[i], (j - i) * sizeof(int64_t))
                    width *= 2
            i = j
    free(tmp)
    return order_arr


def time_bounds(const int64_t[::1] settle_time, const uint8_t[::1] time_valid,
                const int32_t[::1] claim_offsets, const uint8_t[::1] claim_data, const uint8_t[::1] claim_valid):
    """Rows of the smallest and largest (settle_time, claim_id bytes) among the rows that
    have both, as the spec orders them; (-1, -1) if none has."""
    cdef Py_ssize_t n = settle_time.shape[0], i, lo = -1, hi = -1
    with nogil:
        for i in range(n):
            if not (time_valid[i] and claim_valid[i]):
                continue
            if lo < 0:
                lo = i
                hi = i
                continue
            if settle_time[i] < settle_time[lo] or (settle_time[i] == settle_time[lo]
                                                    and id_cmp(claim_offsets, claim_data, i, lo) < 0):
                lo = i
            if settle_time[i] > settle_time[hi] or (settle_time[i] == settle_time[hi]
                                                    and id_cmp(claim_offsets, claim_data, i, hi) > 0):
                hi = i
    return lo, hi


ctypedef struct Claim:
    int64_t visit
    int64_t level
    int64_t locality
    int64_t referred       # 0 or 1 (null is 0)
    int64_t age_low        # age; -1 when null, so that any min_age fails
    int64_t age_high       # age; MAX_AGE_ANY when null, so that any max_age fails
    int64_t held           # identity bits, and ANY_HOLDS
    int64_t effective      # global identity id, -1 none
    int64_t disease        # encoded 3-character category, -1 none


cdef inline bint matches(const MatchRow* m, const Claim* c, const RangeRow[::1] ranges) noexcept nogil:
    """The conjunction of section 6.3 as five bit and compare tests, absent conditions
    encoded by engine/compile.py so that they pass.

    Only called on the candidates of the claim's profile, which already
    match its visit type, level and locality (engine/compile.py).
    """
    cdef int64_t k
    if m.profile_only:
        return True
    if not ((((m.referred_mask >> c.referred) & (<uint64_t>m.effective_mask >> (c.effective + 1))) & 1)
            & ((c.held & m.holds_mask) != 0) & (c.age_low >= m.min_age) & (c.age_high <= m.max_age)):
        return False
    if m.disease_count < 0:
        return True
    if c.disease < 0:
        return False
    for k in range(m.disease_start, m.disease_start + m.disease_count):
        if ranges[k].low <= c.disease <= ranges[k].high:
            return True
    return False


cdef inline int64_t integral(const SegmentRow[::1] segments, int64_t seg_start, int64_t seg_count,
                             int64_t ratio_replace, int64_t ratio_add, int64_t D,
                             bint above_deductible, int64_t y) noexcept nogil:
    """F(y) in fen x bp: the exact integral of the ratio from 0 to y (spec 5.2 step 6)."""
    cdef int64_t total = 0, lo = 0, hi, r, a, b, s
    for s in range(seg_start, seg_start + seg_count):
        if segments[s].upto < 0:
            hi = INT64_MAX
        else:
            hi = segments[s].upto + (D if above_deductible else 0)
        r = clamp_ratio((ratio_replace if ratio_replace >= 0 else segments[s].ratio) + ratio_add)
        a = i64max(lo, D)
        b = i64min(y, hi)
        if b > a:
            total += r * (b - a)
        if hi >= y:
            break
        lo = hi
    return total


def settle(const int64_t[::1] order, const int8_t[::1] status_in,
           const int32_t[::1] policy, const int64_t[::1] slot,
           const int8_t[::1] visit, const int8_t[::1] level, const int8_t[::1] locality,
           const uint8_t[::1] referred, const int32_t[::1] age,
           const int64_t[::1] identity_mask, const int64_t[::1] disease,
           const int64_t[::1] class_b_copay, const int64_t[::1] in_scope_amount,
           const int64_t[::1] in_scope_class_b,
           const PolicyRow[::1] policies, const LayerRow[::1] layers, const RuleRow[::1] rules,
           const SegmentRow[::1] segments, const AdjustmentRow[::1] adjustments,
           const MatchRow[::1] match_rows, const RangeRow[::1] ranges,
           const int64_t[::1] repeat_factors, const int64_t[::1] identity_rank,
           const int64_t[:, :, ::1] rule_candidates, const int64_t[::1] candidate_rules,
           const int64_t[:, :, ::1] adjustment_candidates, const int64_t[::1] candidate_adjustments,
           int64_t[:, ::1] state, const int64_t[:, ::1] state_lines,
           int8_t[::1] status, int32_t[::1] effective, int64_t[::1] deductible_applied,
           int64_t[:, ::1] fund_pay, int64_t[:, ::1] layer_pay, uint8_t[::1] cap_hit,
           int64_t[::1] compliant,
           bint want_deltas, int64_t[:, :, ::1] deltas,
           int64_t trace_row, int64_t[:, ::1] trace, int64_t[:, ::1] trace_acc):
    """Settle every row whose status_in is OK, in `order`, updating the accumulators.

    Outputs are preallocated by the caller and written here for every row:
    `fund_pay` [5, n], `layer_pay` [n, max layers]; `deltas` [n, width, 3]
    (when `want_deltas`) must come zeroed.
    `state` holds one row per accumulator key (slot), kept together so that a
    claim touches one place: admissions, compliant_total, then the fields of
    each (layer, cap group or none) column where the rules' `*_at` say;
    `state_lines` [policies, profiles] are the row's cache lines a claim of
    that profile may touch, which the loop prefetches.
    `trace_row` (-1 for none) records the steps of one row into `trace`
    [max layers, TRACE_NFIELDS] and its key's state row before and after into
    `trace_acc` [2, state width].
    """
    cdef Py_ssize_t n = order.shape[0], k, i
    cdef int64_t width = state.shape[1]
    cdef int64_t p, sl, j, l, r, a, f, li, nl
    cdef int64_t in_scope, class_b, K, base, paid_sum, raw, pay, room, x, start, end
    cdef int64_t Dr, D, g, rr, ra, factor, rep_idx, elig_a, elig_b, class_a, rest
    cdef int64_t dedc_inc, keep, profile, q, q_end, lines
    cdef const PolicyRow* pol
    cdef const LayerRow* lay
    cdef const RuleRow* rule
    cdef const AdjustmentRow* adj
    cdef Claim c
    cdef bint tracing
    # Raw pointers into the 2- and 3-d arrays (all C-contiguous): an index is then one
    # multiply by a constant, not a stride read from the memoryview per access.
    cdef int64_t nprof = rule_candidates.shape[1], nlay = layer_pay.shape[1]
    cdef const int64_t* rc = &rule_candidates[0, 0, 0]
    cdef const int64_t* ac = &adjustment_candidates[0, 0, 0]
    cdef int64_t* fp
    cdef int64_t* lp
    cdef int64_t* row
    cdef int64_t* dl
    if n == 0:
        return
    fp = &fund_pay[0, 0]  # fund f of row i at fp[f * n + i]
    with nogil:
        for k in range(n):
            if k + ROW_PREFETCH_AHEAD < n:
                i = order[k + ROW_PREFETCH_AHEAD]
                if slot[i] >= 0 and status_in[i] == OK:
                    # only the lines of the row this claim's profile may touch (compile._state_layout)
                    row = &state[0, 0] + slot[i] * width
                    lines = state_lines[policy[i],
                                        (visit[i] * PROFILE_LEVELS + level[i]) * PROFILE_LOCALITIES + locality[i]]
                    for f in range(0, width, 8):
                        if (lines >> i64min(f >> 3, 63)) & 1:
                            prefetch_address(row + f)
            i = order[k]
            status[i] = status_in[i]
            effective[i] = -1
            deductible_applied[i] = 0
            cap_hit[i] = 0
            compliant[i] = 0
            for j in range(5):
                fp[j * n + i] = 0
            lp = &layer_pay[i, 0] if nlay else NULL
            for j in range(nlay):
                lp[j] = 0
            if status_in[i] != OK:
                continue
            p = policy[i]
            pol = &policies[p]
            sl = slot[i]
            row = &state[0, 0] + sl * width
            dl = &deltas[i, 0, 0] if want_deltas else NULL
            c.visit = visit[i]
            c.level = level[i]
            c.locality = locality[i]
            c.referred = referred[i] != 0
            c.age_low = age[i]
            c.age_high = age[i] if age[i] >= 0 else MAX_AGE_ANY_C
            c.held = identity_mask[i] | ANY_HOLDS_C
            c.disease = disease[i]
            c.effective = -1
            if identity_mask[i] & pol.identity_mask:  # most claims hold no identity
                for j in range(pol.rank_start, pol.rank_start + pol.rank_count):
                    if (c.held >> identity_rank[j]) & 1:
                        c.effective = identity_rank[j]
                        break
            in_scope = in_scope_amount[i]
            class_b = in_scope_class_b[i]
            K = in_scope + (class_b_copay[i] if pol.includes_class_b_copay else 0)
            if row[1] + K > MAX_COMPLIANT_TOTAL:
                status[i] = AMOUNT_OUT_OF_RANGE
                continue
            # The first layer must have a rule; found before anything changes.
            profile = (c.visit * PROFILE_LEVELS + c.level) * PROFILE_LOCALITIES + c.locality
            l = pol.layer_start
            r = -1
            q_end = rc[(l * nprof + profile) * 2] + rc[(l * nprof + profile) * 2 + 1]
            for q in range(rc[(l * nprof + profile) * 2], q_end):
                j = candidate_rules[q]
                if matches(&match_rows[rules[j].match], &c, ranges):
                    r = j
                    break
            if r < 0:
                status[i] = NO_BENEFIT_RULE
                continue
            tracing = i == trace_row
            if tracing:
                for j in range(width):
                    trace_acc[0, j] = row[j]
            effective[i] = <int32_t>c.effective
            compliant[i] = K
            paid_sum = 0
            nl = pol.layer_count
            for li in range(nl):
                l = pol.layer_start + li
                lay = &layers[l]
                base = in_scope if li == 0 else K - paid_sum
                if li > 0:
                    r = -1
                    q_end = rc[(l * nprof + profile) * 2] + rc[(l * nprof + profile) * 2 + 1]
                    for q in range(rc[(l * nprof + profile) * 2], q_end):
                        j = candidate_rules[q]
                        if matches(&match_rows[rules[j].match], &c, ranges):
                            r = j
                            break
                if tracing:
                    trace[li, TR_RULE] = r
                    trace[li, TR_BASE] = base
                if r < 0:
                    continue
                rule = &rules[r]
                dedc_inc = 0
                if rule.kind == RULE_FIXED_AMOUNT:
                    raw = i64min(rule.amount, base)
                elif rule.kind == RULE_MAX_PERSONAL_SHARE:
                    keep = round_div(rule.amount * K, BP)
                    raw = i64max(0, base - keep)
                else:
                    Dr = rule.deductible
                    factor = BP
                    if li == 0 and rule.repeat_admission and rule.axis == 0 and c.visit == VISIT_INPATIENT:
                        rep_idx = i64min(row[0], pol.repeat_count - 1)
                        factor = repeat_factors[pol.repeat_start + rep_idx]
                        Dr = round_div(rule.deductible * factor, BP)
                        if factor < BP:
                            Dr = i64max(Dr, i64min(pol.repeat_floor, rule.deductible))
                    g = BP
                    rr = -1
                    ra = 0
                    q_end = ac[(l * nprof + profile) * 2] + ac[(l * nprof + profile) * 2 + 1]
                    for q in range(ac[(l * nprof + profile) * 2], q_end):
                        adj = &adjustments[candidate_adjustments[q]]
                        if matches(&match_rows[adj.match], &c, ranges):
                            g = round_div(g * adj.deductible_factor, BP)
                            if adj.ratio >= 0:
                                rr = adj.ratio
                                ra = 0
                            ra += adj.ratio_add
                    D = round_div(Dr * g, BP) if g != BP else Dr
                    if rule.kind == RULE_CLASS_RATIO:
                        x = base
                        class_a = in_scope - class_b
                        elig_a = i64max(0, class_a - D)
                        rest = i64max(0, D - class_a)
                        elig_b = i64max(0, class_b - rest)
                        raw = round_div(
                            elig_a * clamp_ratio((rr if rr >= 0 else rule.ratio_a) + ra)
                            + elig_b * clamp_ratio((rr if rr >= 0 else rule.ratio_b) + ra), BP)
                        dedc_inc = i64min(x, D)
                        start = 0
                        end = x
                    else:
                        x = base
                        start = row[rule.position_at] if rule.axis == 1 else 0
                        end = start + x
                        raw = round_div(integral(segments, rule.segment_start, rule.segment_count,
                                                 rr, ra, D, rule.above_deductible, end), BP)
                        if start > 0:
                            raw -= round_div(integral(segments, rule.segment_start, rule.segment_count,
                                                      rr, ra, D, rule.above_deductible, start), BP)
                        dedc_inc = i64max(0, i64min(end, D) - start)
                        if rule.axis == 1:
                            row[rule.position_at] = end
                            if want_deltas:
                                dl[ACC_FIELDS_C * rule.acc] += x
                    row[rule.charged_at] += dedc_inc
                    if want_deltas:
                        dl[ACC_FIELDS_C * rule.acc + 2] += dedc_inc
                    if tracing:
                        trace[li, TR_DEDUCTIBLE_RULE] = Dr
                        trace[li, TR_REPEAT_FACTOR] = factor
                        trace[li, TR_FACTOR_G] = g
                        trace[li, TR_DEDUCTIBLE] = D
                        trace[li, TR_START] = start
                        trace[li, TR_END] = end
                        trace[li, TR_RATIO_REPLACE] = rr
                        trace[li, TR_RATIO_ADD] = ra
                        trace[li, TR_DEDUCTIBLE_CHARGED] = dedc_inc
                if rule.cap >= 0:
                    room = i64max(0, rule.cap - row[rule.paid_at])
                    pay = i64min(raw, room)
                else:
                    pay = raw
                if pay < raw:
                    cap_hit[i] = 1
                if tracing:
                    trace[li, TR_RAW] = raw
                    trace[li, TR_CAP] = rule.cap
                    trace[li, TR_PAID_BEFORE] = row[rule.paid_at]
                    trace[li, TR_PAY] = pay
                row[rule.paid_at] += pay
                if want_deltas:
                    dl[ACC_FIELDS_C * rule.acc + 1] += pay
                fp[lay.fund * n + i] += pay
                lp[li] = pay
                paid_sum += pay
                if li == 0:
                    deductible_applied[i] = dedc_inc
                    if c.visit == VISIT_INPATIENT:
                        row[0] += 1
            row[1] += K
            if tracing:
                for j in range(width):
                    trace_acc[1, j] = row[j]


def string_codes(const int32_t[::1] offsets, const uint8_t[::1] data, const uint8_t[::1] valid,
                 const int32_t[::1] name_offsets, const uint8_t[::1] name_data, int32_t[::1] out):
    """Index of each string in a short list of names; -1 null, -2 none of them.

    Enum columns and regions are matched here straight from the Arrow
    buffers, which is several times faster than dictionary-encoding them.
    """
    cdef Py_ssize_t n = out.shape[0], i
    cdef int64_t j, names = name_offsets.shape[0] - 1, length, start
    with nogil:
        for i in range(n):
            if not valid[i]:
                out[i] = -1
                continue
            start = offsets[i]
            length = offsets[i + 1] - start
            out[i] = -2
            for j in range(names):
                if (name_offsets[j + 1] - name_offsets[j] == length
                        and memcmp(&data[0] + start, &name_data[0] + name_offsets[j], length) == 0):
                    out[i] = <int32_t>j
                    break


cdef inline int32_t civil_year(int64_t micros) noexcept nogil:
    """Calendar year of a timestamp[us] (days-from-civil inverse, proleptic Gregorian)."""
    cdef int64_t day_us = 86400 * <int64_t>1000000
    cdef int64_t days = micros // day_us, z, era, doe, yoe, y, doy, mp, m
    if micros % day_us < 0:
        days -= 1
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    m = mp + 3 if mp < 10 else mp - 9
    return <int32_t>(y + (1 if m <= 2 else 0))


def calendar_years(const int64_t[::1] micros, int32_t[::1] out):
    """Calendar year of each timestamp[us]: civil_year over an array, so that tests can check
    the arithmetic policy_rows uses against Python's calendar."""
    cdef Py_ssize_t n = out.shape[0], i
    with nogil:
        for i in range(n):
            out[i] = civil_year(micros[i])


# --------------------------------------------------------------------------- columns
# One pass each over Arrow buffers, for the column preparation and the results of a
# chunk: numpy would take several passes and temporaries per column.


cdef inline bint bit_at(const uint8_t* bits, int64_t i) noexcept nogil:
    return (bits[i >> 3] >> (i & 7)) & 1


cdef inline int64_t year_start(int64_t y) noexcept nogil:
    """Microseconds of 1 January of year y, 00:00 (days-from-civil, proleptic Gregorian)."""
    cdef int64_t yy = y - 1  # January counts with the year before, in a March-based year
    cdef int64_t era = (yy if yy >= 0 else yy - 399) // 400
    cdef int64_t yoe = yy - era * 400
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + 306
    return (era * 146097 + doe - 719468) * (86400 * <int64_t>1000000)


def policy_rows(const int32_t[::1] region, const int32_t[::1] scheme, const int64_t[::1] micros,
                const int32_t[:, :, ::1] table, int32_t first_year, int32_t[::1] out):
    """Policy index of each row from (region code, scheme code, calendar year); -1 none
    (negative codes, or a year outside the table).

    Claims come mostly in time order, so the year of the row before is tried
    first: two compares instead of the calendar arithmetic.
    """
    cdef Py_ssize_t n = out.shape[0], i
    cdef int32_t y = 0, years = <int32_t>table.shape[2]
    cdef int64_t lo = 1, hi = 0
    with nogil:
        for i in range(n):
            out[i] = -1
            if region[i] < 0 or scheme[i] < 0:
                continue
            if not (lo <= micros[i] < hi):
                y = civil_year(micros[i])
                lo = year_start(y)
                hi = year_start(y + 1)
            if 0 <= y - first_year < years:
                out[i] = table[region[i], scheme[i], y - first_year]


def year_starts(const int64_t[::1] years, int64_t[::1] out):
    """year_start of each year: for tests, as calendar_years."""
    cdef Py_ssize_t i
    for i in range(years.shape[0]):
        out[i] = year_start(years[i])


def unpack_bits(const uint8_t[::1] bits, int64_t offset, uint8_t[::1] out):
    """out[i] = bit offset + i of an Arrow bitmap (validity, or a boolean column's values)."""
    cdef Py_ssize_t n = out.shape[0], i
    with nogil:
        for i in range(n):
            out[i] = bit_at(&bits[0], offset + i)


def mark_nulls(const uint8_t[::1] validity, int64_t offset, uint8_t[::1] missing):
    """missing[i] = 1 where bit offset + i of an Arrow validity bitmap is 0."""
    cdef Py_ssize_t n = missing.shape[0], i
    with nogil:
        for i in range(n):
            if not bit_at(&validity[0], offset + i):
                missing[i] = 1


def ages(const int16_t[::1] values, const uint8_t[::1] validity, int64_t offset, int32_t[::1] out):
    """Age of each row as int32, -1 where null (empty `validity`: none) or negative."""
    cdef Py_ssize_t n = out.shape[0], i
    cdef bint has_nulls = validity.shape[0] > 0
    with nogil:
        for i in range(n):
            if (has_nulls and not bit_at(&validity[0], offset + i)) or values[i] < 0:
                out[i] = -1
            else:
                out[i] = values[i]


def result_columns(const int8_t[::1] status, const int32_t[::1] policy, const int64_t[::1] total,
                   const int64_t[:, ::1] fund_pay, const int64_t[::1] compliant,
                   const int64_t[:, ::1] layer_pay,
                   int32_t[::1] policy_out, int64_t[::1] fund_total, int64_t[::1] personal,
                   int64_t[::1] compliant_personal, int32_t[::1] layer_offsets):
    """The derived columns of spec section 3 from the kernel's outputs; returns how
    many layer_pays entries there are (layers that paid more than 0), with
    `layer_offsets` [n + 1] their list offsets. Error rows: no policy, all 0."""
    cdef Py_ssize_t n = status.shape[0], i, j
    cdef int64_t nlay = layer_pay.shape[1], s, entries = 0
    with nogil:
        layer_offsets[0] = 0
        for i in range(n):
            if status[i] != OK:
                policy_out[i] = -1
                fund_total[i] = 0
                personal[i] = 0
                compliant_personal[i] = 0
            else:
                policy_out[i] = policy[i]
                s = 0
                for j in range(5):
                    s += fund_pay[j, i]
                fund_total[i] = s
                personal[i] = total[i] - s
                compliant_personal[i] = compliant[i] - s
                for j in range(nlay):
                    if layer_pay[i, j] > 0:
                        entries += 1
            layer_offsets[i + 1] = <int32_t>entries
    return entries


def layer_entries(const int64_t[:, ::1] layer_pay, const int32_t[::1] policy_out,
                  const PolicyRow[::1] policies, int32_t[::1] layer, int64_t[::1] pay):
    """The layer_pays entries counted by result_columns, in row order: the global
    layer index (into the policy set's layer names) and the amount."""
    cdef Py_ssize_t n = layer_pay.shape[0], i, j
    cdef int64_t nlay = layer_pay.shape[1], k = 0
    with nogil:
        for i in range(n):
            if policy_out[i] < 0:
                continue
            for j in range(nlay):
                if layer_pay[i, j] > 0:
                    layer[k] = <int32_t>(policies[policy_out[i]].layer_start + j)
                    pay[k] = layer_pay[i, j]
                    k += 1


cdef inline void column_values(const int64_t* row, const int64_t* index, int64_t j,
                               const int64_t[:, ::1] aside, int64_t a, int64_t b, int64_t* v) noexcept nogil:
    """position, paid, deductible_charged of accumulator column j of a state row, with the
    carried values kept aside for its key (aside rows a..b: column, field, value)."""
    cdef int64_t f, q, at
    for f in range(ACC_FIELDS_C):
        at = index[j * ACC_FIELDS_C + f]
        v[f] = row[at] if at >= 0 else 0
    for q in range(a, b):
        if aside[q, 0] == j:
            v[aside[q, 1]] = aside[q, 2]


cdef inline int64_t aside_start(const int64_t[::1] aside_slot, int64_t a, int64_t slot) noexcept nogil:
    """The first aside row from `a` on whose slot is not below `slot` (the rows are sorted by slot)."""
    while a < aside_slot.shape[0] and aside_slot[a] < slot:
        a += 1
    return a


def accumulator_counts(const int64_t[::1] starts, const uint8_t[::1] arena, const int64_t[:, ::1] state,
                       const int64_t[:, ::1] state_index, const PolicyRow[::1] policies,
                       const int64_t[::1] aside_slot, const int64_t[:, ::1] aside,
                       int32_t[::1] policy_out, int32_t[::1] entries_out):
    """Per key (slot): its policy (the key's 4-byte prefix) and how many layer entries it
    holds (columns with any field not 0), or -1 when it holds nothing at all (left out of
    the closing accumulators). `aside_slot` / `aside` ([k, 3]: column, field, value) are
    the carried values the rows do not keep, sorted by slot. Returns the keys held."""
    cdef Py_ssize_t count = policy_out.shape[0], i
    cdef int64_t a = 0, b, j, n, held = 0, width = state.shape[1]
    cdef int32_t p
    cdef int64_t v[ACC_FIELDS_C]
    cdef const int64_t* row
    with nogil:
        for i in range(count):
            memcpy(&p, &arena[0] + starts[i], 4)
            policy_out[i] = p
            a = aside_start(aside_slot, a, i)
            b = aside_start(aside_slot, a, i + 1)
            row = &state[0, 0] + i * width
            n = 0
            for j in range(policies[p].acc_width):
                column_values(row, &state_index[p, 0], j, aside, a, b, v)
                if v[0] != 0 or v[1] != 0 or v[2] != 0:
                    n += 1
            if n == 0 and row[0] == 0 and row[1] == 0:
                entries_out[i] = -1
            else:
                entries_out[i] = <int32_t>n
                held += 1
    return held


def accumulator_fill(const int64_t[::1] starts, const uint8_t[::1] arena, const int64_t[:, ::1] state,
                     const int64_t[:, ::1] state_index, const PolicyRow[::1] policies,
                     const int64_t[::1] aside_slot, const int64_t[:, ::1] aside,
                     const int32_t[::1] policy, const int32_t[::1] entries, int64_t acc_width,
                     int64_t[::1] person_offsets, uint8_t[::1] person_data,
                     int64_t[::1] admissions, int64_t[::1] compliant_total, int32_t[::1] entry_offsets,
                     int64_t[::1] column, int64_t[::1] position, int64_t[::1] paid, int64_t[::1] charged):
    """The closing accumulators' columns for the keys accumulator_counts held, in slot order:
    person_id bytes (the key after its 4-byte prefix), the head, and per entry its column
    code (policy * acc_width + column, into the policy set's column names) and values."""
    cdef Py_ssize_t count = policy.shape[0], i
    cdef int64_t a = 0, b, j, k = 0, e = 0, length, width = state.shape[1]
    cdef int32_t p
    cdef int64_t v[ACC_FIELDS_C]
    cdef const int64_t* row
    with nogil:
        person_offsets[0] = 0
        entry_offsets[0] = 0
        for i in range(count):
            if entries[i] < 0:
                continue
            p = policy[i]
            a = aside_start(aside_slot, a, i)
            b = aside_start(aside_slot, a, i + 1)
            length = starts[i + 1] - starts[i] - 4
            if length > 0:
                memcpy(&person_data[0] + person_offsets[k], &arena[0] + starts[i] + 4, length)
            person_offsets[k + 1] = person_offsets[k] + length
            row = &state[0, 0] + i * width
            admissions[k] = row[0]
            compliant_total[k] = row[1]
            for j in range(policies[p].acc_width):
                column_values(row, &state_index[p, 0], j, aside, a, b, v)
                if v[0] != 0 or v[1] != 0 or v[2] != 0:
                    column[e] = p * acc_width + j
                    position[e] = v[0]
                    paid[e] = v[1]
                    charged[e] = v[2]
                    e += 1
            k += 1
            entry_offsets[k] = <int32_t>e
