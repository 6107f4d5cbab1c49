# cython: language_level=3, cdivision=True, nonecheck=False, embedsignature=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, or on with MEDSETTLE_BOUNDSCHECK=1.
"""The settlement kernel: the passes of a call over a chunk of claims, no Python object per claim.

Three passes, each without the GIL: `check_rows` (statuses up to
DUPLICATE_CLAIM, claim-id dedup, accumulator slots), `order_rows` (the spec's
(settle_time, claim_id) order) and `settle` (every layer of every claim,
against the accumulator state rows). They read a chunk's columns from
`ClaimColumns`, the policy set from `_tables.PolicyTables` (built once by
engine/compile.py) and write `KernelOutputs`. Each step of spec section 5.2 is
one small inline function below; `settle` only strings them together.
"""
import numpy as np
cimport numpy as cnp
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memcmp
from libc.stdint cimport INT64_MAX, int8_t, int32_t, int64_t, uint8_t, uint64_t

from ._bits cimport bit_at
from ._hashing cimport ClaimIds, AccumulatorKeys, hash_strings, PREFETCH_AHEAD
from ._tables cimport *

cnp.import_array()

cdef extern from *:
    """
    #define MEDSETTLE_BP 10000LL
    #define MEDSETTLE_MAX_AMOUNT 1000000000000LL
    #define MEDSETTLE_MAX_COMPLIANT_TOTAL 100000000000000LL
    #define MEDSETTLE_MAX_AGE_ANY (1LL << 62)
    #define MEDSETTLE_ANY_HOLDS ((int64_t)(1ULL << 63))
    #define MEDSETTLE_MAX_CAP_FACTOR 1000000LL
    #define medsettle_prefetch(p) __builtin_prefetch(p)
    """
    const int64_t BP "MEDSETTLE_BP"
    const int64_t MAX_AMOUNT "MEDSETTLE_MAX_AMOUNT"                # engine/schema.py MAX_AMOUNT, 10^12 fen
    const int64_t MAX_COMPLIANT_TOTAL "MEDSETTLE_MAX_COMPLIANT_TOTAL"  # engine/schema.py MAX_CARRIED, 10^14 fen per key
    const int64_t MAX_AGE_ANY_C "MEDSETTLE_MAX_AGE_ANY"    # engine/compile.py MAX_AGE_ANY
    const int64_t ANY_HOLDS_C "MEDSETTLE_ANY_HOLDS"        # engine/compile.py ANY_HOLDS
    const int64_t MAX_CAP_FACTOR "MEDSETTLE_MAX_CAP_FACTOR"  # engine/schema.py MAX_COMBINED_CAP_FACTOR
    void prefetch_address "medsettle_prefetch"(const void* p) noexcept nogil

ACC_FIELDS = ACC_FIELDS_C
STATE_HEAD = STATE_HEAD_C
PROFILE_SHAPE = (PROFILE_LEVELS, PROFILE_LOCALITIES)
TRACE_NFIELDS = TR_NFIELDS
MAX_AGE_ANY = MAX_AGE_ANY_C
ANY_HOLDS = ANY_HOLDS_C
MAX_AMOUNT_FEN = MAX_AMOUNT
MAX_COMPLIANT_TOTAL_FEN = MAX_COMPLIANT_TOTAL
MAX_COMBINED_CAP_FACTOR = MAX_CAP_FACTOR
BASE_KINDS = {"in_scope": BASE_IN_SCOPE, "remaining": BASE_REMAINING}

# How many claims ahead the loop prefetches accumulator rows (several lines each, so fewer
# rows in flight than hash slots: measured at 10M claims, 8 to 16 rows ahead settled in
# 1.0-1.3 s where 64 took 1.4-1.9 s).
cdef enum:
    ROW_PREFETCH_AHEAD = 12


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


# --------------------------------------------------------------------------- chunk columns and outputs

cdef void* _data(object a, str name, Py_ssize_t itemsize) except? NULL:
    """The data pointer of a C-contiguous array (NULL when empty), checked for its item size."""
    if not a.flags.c_contiguous or a.itemsize != itemsize:
        raise ValueError(f"claim columns: '{name}' must be C-contiguous with {itemsize}-byte items")
    if a.size == 0:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray?>a)


# A chunk's columns as the passes read them (engine/arrow_io.py PreparedClaims).
ctypedef struct Columns:
    int64_t n
    const int32_t* claim_offsets
    const uint8_t* claim_data
    const uint8_t* claim_valid
    const int32_t* person_offsets
    const uint8_t* person_data
    const uint8_t* missing
    const uint8_t* invalid_enum
    const int64_t* total
    const int64_t* self_funded
    const int64_t* over_limit
    const int64_t* class_b_copay
    const int64_t* in_scope
    const int64_t* in_scope_class_b
    const int32_t* policy         # the version in force, -1 none
    const int32_t* key_policy     # its year's first version (PolicyRow.key_policy), -1 none
    const int64_t* identity_mask
    const int8_t* visit
    const int8_t* level
    const int8_t* locality
    const uint8_t* referred
    const int32_t* age
    const int64_t* disease


# (attribute of PreparedClaims, item size)
_COLUMN_ITEMS = (
    ("claim_offsets", 4), ("claim_data", 1), ("claim_valid", 1), ("person_offsets", 4), ("person_data", 1),
    ("missing", 1), ("invalid_enum", 1), ("total", 8), ("self_funded", 8), ("over_limit", 8),
    ("class_b_copay", 8), ("in_scope", 8), ("in_scope_class_b", 8), ("policy", 4), ("identity_mask", 8),
    ("visit", 1), ("level", 1), ("locality", 1), ("referred", 1), ("age", 4), ("disease", 8), ("key_policy", 4),
)


cdef class ClaimColumns:
    """The kernel's view of one prepared chunk: its numpy columns, bound once per chunk."""
    cdef Columns c
    cdef readonly object arrays     # the arrays the pointers point into, kept alive
    cdef readonly Py_ssize_t n

    def __init__(self, prepared):
        """`prepared`: an object with the columns of `_COLUMN_ITEMS` as numpy arrays and `n`."""
        arrays = []
        cdef const void* p[22]
        cdef int k = 0
        for name, size in _COLUMN_ITEMS:
            a = getattr(prepared, name)
            arrays.append(a)
            p[k] = _data(a, name, size)
            k += 1
        self.arrays = tuple(arrays)
        self.n = prepared.n
        self.c.n = self.n
        for name, size in _COLUMN_ITEMS[7:]:
            if len(getattr(prepared, name)) != self.n:
                raise ValueError(f"claim columns: '{name}' has {len(getattr(prepared, name))} rows, not {self.n}")
        if len(prepared.claim_offsets) != self.n + 1 or len(prepared.person_offsets) != self.n + 1:
            raise ValueError("claim columns: string offsets must have n + 1 entries")
        self.c.claim_offsets = <const int32_t*>p[0]
        self.c.claim_data = <const uint8_t*>p[1]
        self.c.claim_valid = <const uint8_t*>p[2]
        self.c.person_offsets = <const int32_t*>p[3]
        self.c.person_data = <const uint8_t*>p[4]
        self.c.missing = <const uint8_t*>p[5]
        self.c.invalid_enum = <const uint8_t*>p[6]
        self.c.total = <const int64_t*>p[7]
        self.c.self_funded = <const int64_t*>p[8]
        self.c.over_limit = <const int64_t*>p[9]
        self.c.class_b_copay = <const int64_t*>p[10]
        self.c.in_scope = <const int64_t*>p[11]
        self.c.in_scope_class_b = <const int64_t*>p[12]
        self.c.policy = <const int32_t*>p[13]
        self.c.identity_mask = <const int64_t*>p[14]
        self.c.visit = <const int8_t*>p[15]
        self.c.level = <const int8_t*>p[16]
        self.c.locality = <const int8_t*>p[17]
        self.c.referred = <const uint8_t*>p[18]
        self.c.age = <const int32_t*>p[19]
        self.c.disease = <const int64_t*>p[20]
        self.c.key_policy = <const int32_t*>p[21]


ctypedef struct Outputs:
    int8_t* status
    int32_t* effective
    int64_t* deductible_applied
    int64_t* fund_pay           # [FUNDS, n]: fund f of row i at f * n + i
    int64_t* layer_pay          # [n, max_layers]
    int64_t max_layers
    uint8_t* cap_hit
    int64_t* compliant
    int64_t* deltas             # [n, acc_width, ACC_FIELDS] when wanted, else NULL
    int64_t acc_width
    int64_t* trace              # [max_layers, TR_NFIELDS]
    int64_t* trace_acc          # [2, state width]


cdef enum:
    FUNDS_C = 5


cdef class KernelOutputs:
    """What `settle` writes for a chunk: every row of each array, so they need not come zeroed
    (except `deltas`). The arrays are numpy, read by engine/arrow_io.py to build results."""
    cdef Outputs o
    cdef readonly object status, effective, deductible_applied, fund_pay, layer_pay, cap_hit, compliant
    cdef readonly object deltas, trace, trace_acc
    cdef readonly bint want_deltas

    def __init__(self, Py_ssize_t n, Py_ssize_t max_layers, Py_ssize_t acc_width, Py_ssize_t state_width,
                 bint deltas=False, allocate=np.empty):
        """`allocate(shape, dtype)` gives the arrays written in full (e.g. from a memory pool)."""
        self.want_deltas = deltas
        self.status = allocate(n, np.int8)
        self.effective = allocate(n, np.int32)
        self.deductible_applied = allocate(n, np.int64)
        self.fund_pay = allocate((FUNDS_C, n), np.int64)
        self.layer_pay = allocate((n, max_layers), np.int64)
        self.cap_hit = allocate(n, np.uint8)
        self.compliant = allocate(n, np.int64)
        self.deltas = np.zeros((n if deltas else 1, acc_width, ACC_FIELDS_C), dtype=np.int64)
        self.trace = np.zeros((max(max_layers, 1), TR_NFIELDS), dtype=np.int64)
        self.trace_acc = np.zeros((2, state_width), dtype=np.int64)
        self.o.status = <int8_t*>_data(self.status, "status", 1)
        self.o.effective = <int32_t*>_data(self.effective, "effective", 4)
        self.o.deductible_applied = <int64_t*>_data(self.deductible_applied, "deductible_applied", 8)
        self.o.fund_pay = <int64_t*>_data(self.fund_pay, "fund_pay", 8)
        self.o.layer_pay = <int64_t*>_data(self.layer_pay, "layer_pay", 8)
        self.o.max_layers = max_layers
        self.o.cap_hit = <uint8_t*>_data(self.cap_hit, "cap_hit", 1)
        self.o.compliant = <int64_t*>_data(self.compliant, "compliant", 8)
        self.o.deltas = <int64_t*>_data(self.deltas, "deltas", 8) if deltas else NULL
        self.o.acc_width = acc_width
        self.o.trace = <int64_t*>_data(self.trace, "trace", 8)
        self.o.trace_acc = <int64_t*>_data(self.trace_acc, "trace_acc", 8)
        for a in (self.status, self.effective, self.deductible_applied, self.fund_pay, self.layer_pay,
                  self.cap_hit, self.compliant):
            if not a.flags.writeable:
                raise ValueError("kernel outputs must be writable")


# --------------------------------------------------------------------------- statuses and keys

cdef inline int8_t amount_status(const Columns* col, Py_ssize_t i) noexcept nogil:
    """INVALID_AMOUNT, AMOUNT_OUT_OF_RANGE or AMOUNT_MISMATCH, in that order; OK if none."""
    cdef int64_t total = col.total[i], self_funded = col.self_funded[i], over_limit = col.over_limit[i]
    cdef int64_t class_b_copay = col.class_b_copay[i], in_scope = col.in_scope[i]
    cdef int64_t in_scope_class_b = col.in_scope_class_b[i]
    if (total | self_funded | over_limit | class_b_copay | in_scope | in_scope_class_b) < 0:
        return INVALID_AMOUNT
    if (total > MAX_AMOUNT or self_funded > MAX_AMOUNT or over_limit > MAX_AMOUNT
            or class_b_copay > MAX_AMOUNT or in_scope > MAX_AMOUNT or in_scope_class_b > MAX_AMOUNT):
        return AMOUNT_OUT_OF_RANGE
    if total != self_funded + over_limit + class_b_copay + in_scope or in_scope_class_b > in_scope:
        return AMOUNT_MISMATCH
    return OK


cdef inline int8_t row_status(const Columns* col, const Tables* t, Py_ssize_t i) noexcept nogil:
    """The status of section 3's precedence up to UNKNOWN_IDENTITY (duplicates come after)."""
    cdef int8_t s
    if col.missing[i]:
        return MISSING_FIELD
    if col.invalid_enum[i]:
        return INVALID_VALUE
    s = amount_status(col, i)
    if s != OK:
        return s
    if col.policy[i] < 0:
        return UNKNOWN_POLICY
    # unknown only when no version of the year declares it (a null item is never declared)
    if col.identity_mask[i] & ~t.policies[col.policy[i]].year_identity_mask:
        return UNKNOWN_IDENTITY
    return OK


def check_rows(ClaimColumns columns, PolicyTables tables, ClaimIds claim_ids, AccumulatorKeys keys,
               int8_t[::1] status, int64_t[::1] slot):
    """Statuses up to DUPLICATE_CLAIM, in the spec's order of precedence, and key slots.

    Every non-null claim id is interned in input order, so a
    first occurrence that is rejected still makes later ones duplicates.
    """
    cdef const Columns* col = &columns.c
    cdef const Tables* t = &tables.t
    cdef Py_ssize_t n = col.n, i
    cdef int err = 0
    cdef int64_t start
    cdef bint is_new
    cdef int8_t s
    cdef uint64_t* h
    if status.shape[0] != n or slot.shape[0] != n:
        raise ValueError("check_rows: status and slot must have a row per claim")
    if n == 0:
        return
    h = claim_ids.hash_scratch(n + 1)
    if h == NULL:
        raise MemoryError()
    with nogil:
        hash_strings(col.claim_offsets, col.claim_data, n, h)
        for i in range(n):
            if i + PREFETCH_AHEAD < n:
                claim_ids.prefetch(h[i + PREFETCH_AHEAD])
            s = row_status(col, t, i)
            if col.claim_valid[i]:
                start = col.claim_offsets[i]
                if claim_ids.intern(col.claim_data + start, col.claim_offsets[i + 1] - start, h[i], &is_new) < 0:
                    err = 1
                    break
                if not is_new and s == OK:
                    s = DUPLICATE_CLAIM
            status[i] = s
        if err == 0:
            # keys by the year's first version: every version of a year shares the key's accumulators
            err = keys.intern_rows(col.person_offsets, col.person_data, col.key_policy, &status[0], &slot[0], n)
    if err:
        raise MemoryError("claim id or key table")


# --------------------------------------------------------------------------- order

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


cdef struct Bounds:
    Py_ssize_t lo, hi
    int64_t lo_t, hi_t


cdef inline void bounds_row(Bounds* b, const int64_t* settle_time, const int32_t[::1] claim_offsets,
                            const uint8_t[::1] claim_data, Py_ssize_t i) noexcept nogil:
    """Row i (settle_time and claim_id both present) into the smallest and largest so far."""
    cdef int64_t t = settle_time[i]
    if b.lo < 0:
        b.lo = b.hi = i
        b.lo_t = b.hi_t = t
        return
    if t < b.lo_t or (t == b.lo_t and id_cmp(claim_offsets, claim_data, i, b.lo) < 0):
        b.lo = i
        b.lo_t = t
    if t > b.hi_t or (t == b.hi_t and id_cmp(claim_offsets, claim_data, i, b.hi) > 0):
        b.hi = i
        b.hi_t = t


cdef inline uint8_t bits8(const uint8_t[::1] bits, int64_t at) noexcept nogil:
    """The 8 validity bits from bit `at` on (an empty bitmap: all set); bits[at // 8 + 1] must
    exist when `at` is not a multiple of 8."""
    cdef int64_t byte = at >> 3, shift = at & 7
    if bits.shape[0] == 0:
        return 0xFF
    if shift == 0:
        return bits[byte]
    return <uint8_t>((bits[byte] >> shift) | (bits[byte + 1] << (8 - shift)))


def time_bounds(const int64_t[::1] settle_time, const uint8_t[::1] time_bits, int64_t time_offset,
                const int32_t[::1] claim_offsets, const uint8_t[::1] claim_data, const uint8_t[::1] claim_bits,
                int64_t claim_offset):
    """Rows of the smallest and largest (settle_time, claim_id bytes) among the rows that
    have both, as the spec orders them; (-1, -1) if none has. A row has a value where bit
    offset + i of its column's validity bitmap is set (an empty bitmap: no nulls), read in
    place eight rows at a time: the order check of a streamed file is one pass, no unpacked
    masks, and a test per row only in the few groups of eight that hold a null."""
    cdef Py_ssize_t n = settle_time.shape[0], i, r, whole
    cdef Bounds b
    cdef uint8_t both
    if (claim_offsets.shape[0] < n + 1 or (time_bits.shape[0] and time_bits.shape[0] * 8 < time_offset + n)
            or (claim_bits.shape[0] and claim_bits.shape[0] * 8 < claim_offset + n)):
        raise ValueError("time_bounds: inconsistent shapes")
    b.lo = b.hi = -1
    b.lo_t = b.hi_t = 0
    if n == 0:
        return -1, -1
    # groups of eight whose bits8 reads no byte past either bitmap
    whole = n // 8
    if whole and ((time_bits.shape[0] and (time_offset & 7) and (time_offset + 8 * whole) // 8 >= time_bits.shape[0])
                  or (claim_bits.shape[0] and (claim_offset & 7)
                      and (claim_offset + 8 * whole) // 8 >= claim_bits.shape[0])):
        whole -= 1
    with nogil:
        for i in range(0, 8 * whole, 8):
            both = bits8(time_bits, time_offset + i) & bits8(claim_bits, claim_offset + i)
            if both == 0xFF:
                for r in range(i, i + 8):
                    bounds_row(&b, &settle_time[0], claim_offsets, claim_data, r)
            elif both:
                for r in range(8):
                    if (both >> r) & 1:
                        bounds_row(&b, &settle_time[0], claim_offsets, claim_data, i + r)
        for r in range(8 * whole, n):
            if ((time_bits.shape[0] == 0 or bit_at(&time_bits[0], time_offset + r))
                    and (claim_bits.shape[0] == 0 or bit_at(&claim_bits[0], claim_offset + r))):
                bounds_row(&b, &settle_time[0], claim_offsets, claim_data, r)
    return b.lo, b.hi


# --------------------------------------------------------------------------- the settlement loop

ctypedef struct Claim:
    int64_t visit
    int64_t level
    int64_t locality
    int64_t profile        # (visit * PROFILE_LEVELS + level) * PROFILE_LOCALITIES + locality
    int64_t referred       # 0 or 1 (null is 0)
    int64_t age_low        # age; -1 when null, so that any min_age fails
    int64_t age_high       # age; MAX_AGE_ANY when null, so that any max_age fails
    int64_t held           # identity bits, and ANY_HOLDS
    int64_t effective      # global identity id, -1 none
    int64_t disease        # encoded 3-character category, -1 none
    int64_t in_scope       # fen
    int64_t class_b        # in-scope class B, fen
    int64_t compliant      # K of spec 5.1, fen


ctypedef struct Step:
    # One layer of one claim (spec 5.2), as `engine.explain` reads it from the trace (TR_*).
    int64_t rule
    int64_t base
    int64_t deductible_rule     # the rule's deductible after the repeat-admission factor
    int64_t factor_g            # product of the adjustments' deductible factors, bp
    int64_t deductible          # D
    int64_t start               # the slice [start, end) of the axis
    int64_t end
    int64_t ratio_replace       # -1 none
    int64_t ratio_add
    int64_t raw
    int64_t cap                 # -1 uncapped
    int64_t paid_before
    int64_t pay
    int64_t deductible_charged
    int64_t repeat_factor
    # not traced:
    int64_t cap_factor          # product of the adjustments' cap factors, bp, at most MAX_CAP_FACTOR
    bint uncapped               # an adjustment lifted the rule's caps


cdef inline void load_claim(const Columns* col, const Tables* t, const PolicyRow* pol, Py_ssize_t i,
                            Claim* c) noexcept nogil:
    """Row i's fields as the rules test them, and its effective identity (section 5.1)."""
    cdef int64_t j
    c.visit = col.visit[i]
    c.level = col.level[i]
    c.locality = col.locality[i]
    c.profile = (c.visit * PROFILE_LEVELS + c.level) * PROFILE_LOCALITIES + c.locality
    c.referred = col.referred[i] != 0
    c.age_low = col.age[i]
    c.age_high = col.age[i] if col.age[i] >= 0 else MAX_AGE_ANY_C
    c.held = col.identity_mask[i] | ANY_HOLDS_C
    c.disease = col.disease[i]
    c.effective = -1
    if col.identity_mask[i] & pol.identity_mask:  # most claims hold no identity
        for j in range(pol.rank_start, pol.rank_start + pol.rank_count):
            if (c.held >> t.identity_rank[j]) & 1:
                c.effective = t.identity_rank[j]
                break
    c.in_scope = col.in_scope[i]
    c.class_b = col.in_scope_class_b[i]
    c.compliant = c.in_scope + (col.class_b_copay[i] if pol.includes_class_b_copay else 0)


cdef inline bint matches(const MatchRow* m, const Claim* c, const RangeRow* ranges) noexcept nogil:
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


cdef inline int64_t find_rule(const Tables* t, int64_t l, const Claim* c) noexcept nogil:
    """Step 1: the first rule of layer l that the claim matches, -1 none."""
    cdef const int64_t* cand = t.rule_candidates + (l * t.profiles + c.profile) * 2
    cdef int64_t q, j
    for q in range(cand[0], cand[0] + cand[1]):
        j = t.candidate_rules[q]
        if matches(&t.matches[t.rules[j].match], c, t.ranges):
            return j
    return -1


cdef inline void apply_adjustments(const Tables* t, int64_t l, const Claim* c, Step* s) noexcept nogil:
    """Step 2: every matching adjustment of layer l in file order: deductible factors
    multiplied (rounded after each), a ratio replaced, ratio additions summed (these three
    used by ratio and segments rules only), cap factors multiplied (rounded after each, at
    most MAX_CAP_FACTOR) and `uncapped` (these two used by every kind of rule)."""
    cdef const int64_t* cand = t.adjustment_candidates + (l * t.profiles + c.profile) * 2
    cdef const AdjustmentRow* adj
    cdef int64_t q
    s.factor_g = BP
    s.ratio_replace = -1
    s.ratio_add = 0
    s.cap_factor = BP
    s.uncapped = False
    for q in range(cand[0], cand[0] + cand[1]):
        adj = &t.adjustments[t.candidate_adjustments[q]]
        if matches(&t.matches[adj.match], c, t.ranges):
            s.factor_g = round_div(s.factor_g * adj.deductible_factor, BP)
            if adj.ratio >= 0:
                s.ratio_replace = adj.ratio
                s.ratio_add = 0
            s.ratio_add += adj.ratio_add
            if adj.cap_factor != BP:
                s.cap_factor = i64min(MAX_CAP_FACTOR, round_div(s.cap_factor * adj.cap_factor, BP))
            s.uncapped |= adj.uncapped != 0


cdef inline void find_deductible(const Tables* t, const PolicyRow* pol, const LayerRow* lay, const RuleRow* rule,
                                 const Claim* c, int64_t admissions, Step* s) noexcept nogil:
    """Steps 3-4: the rule's deductible, lowered for a repeat admission where the layer
    allows it (claim axis, inpatient), then times the adjustments' factor."""
    cdef int64_t index
    s.deductible_rule = rule.deductible
    s.repeat_factor = BP
    if lay.repeat_applies and rule.repeat_admission and rule.axis == 0 and c.visit == VISIT_INPATIENT:
        index = i64min(admissions, pol.repeat_count - 1)
        s.repeat_factor = t.repeat_factors[pol.repeat_start + index]
        s.deductible_rule = round_div(rule.deductible * s.repeat_factor, BP)
        if s.repeat_factor < BP:
            s.deductible_rule = i64max(s.deductible_rule, i64min(pol.repeat_floor, rule.deductible))
    s.deductible = (round_div(s.deductible_rule * s.factor_g, BP) if s.factor_g != BP
                    else s.deductible_rule)


cdef inline int64_t ratio_of(int64_t ratio, const Step* s) noexcept nogil:
    """A rule's ratio after the adjustments (replaced, then added to), clamped to [0, BP]."""
    return clamp_ratio((s.ratio_replace if s.ratio_replace >= 0 else ratio) + s.ratio_add)


cdef inline int64_t pay_fixed_amount(const RuleRow* rule, const Step* s) noexcept nogil:
    return i64min(rule.amount, s.base)


cdef inline int64_t pay_guarantee(const RuleRow* rule, const Claim* c, const Step* s) noexcept nogil:
    """max_personal_share: the fund pays what leaves the person at most that share of K."""
    return i64max(0, s.base - round_div(rule.amount * c.compliant, BP))


cdef inline int64_t pay_class_ratio(const RuleRow* rule, const Claim* c, Step* s) noexcept nogil:
    """Class ratios: the deductible taken from class A first, each class at its ratio."""
    cdef int64_t D = s.deductible
    cdef int64_t class_a = c.in_scope - c.class_b
    cdef int64_t elig_a = i64max(0, class_a - D)
    cdef int64_t elig_b = i64max(0, c.class_b - i64max(0, D - class_a))
    s.start = 0
    s.end = s.base
    s.deductible_charged = i64min(s.base, D)
    return round_div(elig_a * ratio_of(rule.ratio_a, s) + elig_b * ratio_of(rule.ratio_b, s), BP)


cdef inline int64_t integral(const Tables* t, const RuleRow* rule, const Step* s, int64_t y) noexcept nogil:
    """F(y) in fen x bp: the exact integral of the ratio from 0 to y (spec 5.2 step 6)."""
    cdef int64_t total = 0, lo = 0, hi, r, a, b, k
    cdef int64_t D = s.deductible
    cdef const SegmentRow* seg
    for k in range(rule.segment_start, rule.segment_start + rule.segment_count):
        seg = &t.segments[k]
        if seg.upto < 0:
            hi = INT64_MAX
        else:
            hi = seg.upto + (D if rule.above_deductible else 0)
        r = ratio_of(seg.ratio, s)
        a = i64max(lo, D)
        b = i64min(y, hi)
        if b > a:
            total += r * (b - a)
        if hi >= y:
            break
        lo = hi
    return total


cdef inline int64_t pay_segments(const Tables* t, const RuleRow* rule, const int64_t* row, Step* s) noexcept nogil:
    """Segments on the claim's axis or the year's (from the position the year has reached)."""
    s.start = row[rule.position_at] if rule.axis == 1 else 0
    s.end = s.start + s.base
    s.deductible_charged = i64max(0, i64min(s.end, s.deductible) - s.start)
    if s.start > 0:
        return (round_div(integral(t, rule, s, s.end), BP)
                - round_div(integral(t, rule, s, s.start), BP))
    return round_div(integral(t, rule, s, s.end), BP)


cdef inline int64_t scaled_cap(int64_t cap, const Step* s) noexcept nogil:
    return round_div(cap * s.cap_factor, BP) if s.cap_factor != BP else cap


cdef inline int64_t cap_pay(const Tables* t, const RuleRow* rule, const int64_t* row, Step* s) noexcept nogil:
    """Step 7: the pay, limited by the least room any of the rule's cap groups has left this
    year, each cap times the cap factor; the trace keeps the group that binds (the first on
    a tie). No group, or `uncapped`: the raw amount (cap -1)."""
    cdef int64_t k, cap, room, best
    cdef const CapRow* g
    s.cap = -1
    s.paid_before = row[rule.paid_at]
    if rule.cap < 0 or s.uncapped:
        return s.raw
    s.cap = scaled_cap(rule.cap, s)
    best = i64max(0, s.cap - s.paid_before)
    for k in range(rule.cap_start, rule.cap_start + rule.cap_count):
        g = &t.caps[k]
        cap = scaled_cap(g.cap, s)
        room = i64max(0, cap - row[g.paid_at])
        if room < best:
            best = room
            s.cap = cap
            s.paid_before = row[g.paid_at]
    return i64min(s.raw, best)


cdef inline void settle_layer(const Tables* t, const PolicyRow* pol, int64_t l, const RuleRow* rule,
                              const Claim* c, int64_t* row, int64_t* delta, Step* s) noexcept nogil:
    """Steps 2-8 of one layer whose rule is chosen: s.base in, s.pay out, the key's state row
    (and the claim's deltas, when not NULL) moved by what the layer charged and paid."""
    cdef const LayerRow* lay = &t.layers[l]
    cdef int64_t k
    apply_adjustments(t, l, c, s)
    if rule.kind == RULE_FIXED_AMOUNT:
        s.raw = pay_fixed_amount(rule, s)
    elif rule.kind == RULE_MAX_PERSONAL_SHARE:
        s.raw = pay_guarantee(rule, c, s)
    else:
        find_deductible(t, pol, lay, rule, c, row[0], s)
        if rule.kind == RULE_CLASS_RATIO:
            s.raw = pay_class_ratio(rule, c, s)
        else:
            s.raw = pay_segments(t, rule, row, s)
            if rule.axis == 1:
                row[rule.position_at] = s.end
                if delta != NULL:
                    delta[ACC_FIELDS_C * rule.acc] += s.base
        row[rule.charged_at] += s.deductible_charged
        if delta != NULL:
            delta[ACC_FIELDS_C * rule.acc + 2] += s.deductible_charged
    s.pay = cap_pay(t, rule, row, s)
    row[rule.paid_at] += s.pay  # the first group's entry, or the (layer, none) one
    if delta != NULL:
        delta[ACC_FIELDS_C * rule.acc + 1] += s.pay
    for k in range(rule.cap_start, rule.cap_start + rule.cap_count):  # every group grows, capped or not
        row[t.caps[k].paid_at] += s.pay
        if delta != NULL:
            delta[ACC_FIELDS_C * t.caps[k].acc + 1] += s.pay


cdef inline void record_step(int64_t* trace, const Step* s) noexcept nogil:
    trace[TR_RULE] = s.rule
    trace[TR_BASE] = s.base
    trace[TR_DEDUCTIBLE_RULE] = s.deductible_rule
    trace[TR_FACTOR_G] = s.factor_g
    trace[TR_DEDUCTIBLE] = s.deductible
    trace[TR_START] = s.start
    trace[TR_END] = s.end
    trace[TR_RATIO_REPLACE] = s.ratio_replace
    trace[TR_RATIO_ADD] = s.ratio_add
    trace[TR_RAW] = s.raw
    trace[TR_CAP] = s.cap
    trace[TR_PAID_BEFORE] = s.paid_before
    trace[TR_PAY] = s.pay
    trace[TR_DEDUCTIBLE_CHARGED] = s.deductible_charged
    trace[TR_REPEAT_FACTOR] = s.repeat_factor


cdef inline void clear_row(Outputs* o, Py_ssize_t n, Py_ssize_t i, int8_t status) noexcept nogil:
    cdef int64_t j
    o.status[i] = status
    o.effective[i] = -1
    o.deductible_applied[i] = 0
    o.cap_hit[i] = 0
    o.compliant[i] = 0
    for j in range(FUNDS_C):
        o.fund_pay[j * n + i] = 0
    for j in range(o.max_layers):
        o.layer_pay[i * o.max_layers + j] = 0


cdef inline void prefetch_row(const Tables* t, const Columns* col, const int64_t* state, int64_t width,
                              const int8_t* status_in, const int64_t* slot, Py_ssize_t i) noexcept nogil:
    """The lines of row i's state row that its claim profile may touch (compile._state_layout)."""
    cdef int64_t f, lines
    cdef const int64_t* row
    if slot[i] < 0 or status_in[i] != OK:
        return
    row = state + slot[i] * width
    lines = t.state_lines[col.policy[i] * t.profiles
                          + (col.visit[i] * PROFILE_LEVELS + col.level[i]) * PROFILE_LOCALITIES + col.locality[i]]
    for f in range(0, width, 8):
        if (lines >> i64min(f >> 3, 63)) & 1:
            prefetch_address(row + f)


cdef inline int8_t settle_claim(const Tables* t, const Columns* col, Py_ssize_t i, int64_t* row, int64_t width,
                                Outputs* o, Py_ssize_t n, bint want_deltas, int64_t* trace,
                                int64_t* trace_acc) noexcept nogil:
    """Every layer of claim i (spec 5.1-5.2) against its key's state row; returns its status.
    `trace` / `trace_acc` are NULL unless this is the row being explained."""
    cdef const PolicyRow* pol = &t.policies[col.policy[i]]
    cdef int64_t* delta = o.deltas + i * o.acc_width * ACC_FIELDS_C if want_deltas else NULL
    cdef int64_t l, end, j, paid_sum = 0
    cdef Claim c
    cdef Step s
    load_claim(col, t, pol, i, &c)
    if row[1] + c.compliant > MAX_COMPLIANT_TOTAL:
        return AMOUNT_OUT_OF_RANGE
    # The first layer's rule is found before anything changes: a required layer without one
    # settles nothing. Every other layer's rule is found just before its turn.
    l = pol.layer_start
    end = l + pol.layer_count
    s.rule = find_rule(t, l, &c) if l < end else -1
    if l < end and s.rule < 0 and t.layers[l].required:
        return NO_BENEFIT_RULE
    if trace_acc != NULL:
        for j in range(width):
            trace_acc[j] = row[j]
    o.effective[i] = <int32_t>c.effective
    o.compliant[i] = c.compliant
    while l < end:
        s.base = c.in_scope if t.layers[l].base_kind == BASE_IN_SCOPE else c.compliant - paid_sum
        s.deductible_charged = 0
        if trace != NULL:  # what a layer's kind does not compute is recorded as 0
            s.deductible_rule = s.factor_g = s.deductible = s.start = s.end = 0
            s.ratio_replace = s.ratio_add = s.raw = s.cap = s.paid_before = s.pay = 0
            s.repeat_factor = 0
        if s.rule >= 0:
            settle_layer(t, pol, l, &t.rules[s.rule], &c, row, delta, &s)
            if s.pay < s.raw:
                o.cap_hit[i] = 1
            o.fund_pay[t.layers[l].fund * n + i] += s.pay
            o.layer_pay[i * o.max_layers + (l - pol.layer_start)] = s.pay
            paid_sum += s.pay
            if t.layers[l].reports_deductible:
                o.deductible_applied[i] = s.deductible_charged
        if trace != NULL:
            record_step(trace + (l - pol.layer_start) * TR_NFIELDS, &s)
        l += 1
        if l < end:
            s.rule = find_rule(t, l, &c)
    if c.visit == VISIT_INPATIENT:
        row[0] += 1
    row[1] += c.compliant
    if trace_acc != NULL:
        for j in range(width):
            trace_acc[width + j] = row[j]
    return OK


def settle(PolicyTables tables, ClaimColumns columns, const int64_t[::1] order, const int8_t[::1] status_in,
           const int64_t[::1] slot, int64_t[:, ::1] state, KernelOutputs out, int64_t trace_row=-1):
    """Settle every row whose status_in is OK, in `order`, updating the accumulators.

    Every row of `out` is written (its `deltas`, when wanted, must come zeroed).
    `state` holds one row per accumulator key (slot), kept together so that a
    claim touches one place: admissions, compliant_total, then the fields of
    each (layer, cap group or none) column where the rules' `*_at` say.
    `trace_row` (-1 for none) records the steps of one row into `out.trace`
    and its key's state row before and after into `out.trace_acc`.
    """
    # Local copies: stores through the output and state pointers cannot alias a local, so
    # the compiler keeps the table pointers in registers instead of reloading them.
    cdef Tables tl = tables.t
    cdef Columns cl = columns.c
    cdef Outputs ol = out.o
    cdef const Tables* t = &tl
    cdef const Columns* col = &cl
    cdef Outputs* o = &ol
    cdef Py_ssize_t n = col.n, k, i
    cdef int64_t width = state.shape[1]
    cdef bint want_deltas = o.deltas != NULL
    cdef int64_t* rows
    if order.shape[0] != n or status_in.shape[0] != n or slot.shape[0] != n or out.status.shape[0] != n:
        raise ValueError("settle: order, statuses, slots and outputs must have a row per claim")
    if out.trace_acc.shape[1] != width or out.deltas.shape[1] < tables.arrays["policies"]["acc_width"].max(initial=0):
        raise ValueError("settle: outputs sized for another state table or policy set")
    if n == 0:
        return
    rows = &state[0, 0]
    with nogil:
        for k in range(n):
            if k + ROW_PREFETCH_AHEAD < n:
                prefetch_row(t, col, rows, width, &status_in[0], &slot[0], order[k + ROW_PREFETCH_AHEAD])
            i = order[k]
            clear_row(o, n, i, status_in[i])
            if status_in[i] != OK:
                continue
            # constants where they can be: each inlined copy drops the code it cannot run
            # (no trace, no deltas: 7 % fewer instructions than one copy testing them per layer)
            if i == trace_row:
                o.status[i] = settle_claim(t, col, i, rows + slot[i] * width, width, o, n, want_deltas,
                                           o.trace, o.trace_acc)
            elif want_deltas:
                o.status[i] = settle_claim(t, col, i, rows + slot[i] * width, width, o, n, True, NULL, NULL)
            else:
                o.status[i] = settle_claim(t, col, i, rows + slot[i] * width, width, o, n, False, NULL, NULL)
