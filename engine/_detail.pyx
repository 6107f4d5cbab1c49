# cython: language_level=3, cdivision=True, nonecheck=False, embedsignature=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, or on with MEDSETTLE_BOUNDSCHECK=1.
"""status_detail's sentences, formatted in C: one call per batch writes every error row's
sentence into one byte buffer and the batch's int32 string offsets.

engine/detail.py finds the error rows and their codes and hands over, per batch,
the Arrow buffers of the claim columns the present codes read (`Columns`: a
dictionary column as its indices and its few entries, a string column as
offsets and bytes, int64 and timestamp values, bitmaps as they are), and once
per policy set the tables the version in force is looked up in (`Places`).
`sentences` then writes each row with one small inline function per code,
without the GIL and with no Python object per row. The texts are those the
Python f-strings wrote (tests/detail_reference.py checks them byte for byte).
"""
import numpy as np
cimport numpy as cnp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memcmp, strlen
from libc.stdint cimport INT32_MAX, int8_t, int16_t, int32_t, int64_t, uint8_t, uint64_t

from ._bits cimport bit_at
from ._calendar cimport civil_from_days, day_of_micros

cnp.import_array()

#: The column slots of `Columns`, in this order: spec section 2's REQUIRED_COLUMNS (the
#: order MISSING_FIELD names them in) with the six amounts at 8-13, then the rest the
#: sentences read; "identities.item" is the identities' list items, "policy_id" the results'.
COLUMNS = ("claim_id", "person_id", "region", "scheme", "settle_time", "visit_type", "facility_level",
           "locality", "total_amount", "self_funded_amount", "over_limit_amount", "class_b_copay_amount",
           "in_scope_amount", "in_scope_class_b_amount", "referred", "identities", "identities.item",
           "policy_id")

cdef enum:
    CLAIM_ID, PERSON_ID, REGION, SCHEME, SETTLE_TIME, VISIT_TYPE, FACILITY_LEVEL, LOCALITY
    TOTAL, SELF_FUNDED, OVER_LIMIT, CLASS_B_COPAY, IN_SCOPE, CLASS_B, REFERRED, IDENTITIES, ITEMS
    POLICY_ID, NSLOTS
    REQUIRED = 13  # the first 13 slots
    FIRST_AMOUNT = TOTAL
    AMOUNTS = 6
    MAX_ENUM_VALUES = 16

# Status codes (engine/schema.py STATUSES); a code past NO_BENEFIT_RULE is one this module
# does not know, said as "status NAME" from the caller's table.
cdef enum:
    MISSING_FIELD = 1
    INVALID_VALUE, INVALID_AMOUNT, AMOUNT_OUT_OF_RANGE, AMOUNT_MISMATCH, UNKNOWN_POLICY, UNKNOWN_IDENTITY
    DUPLICATE_CLAIM, NO_BENEFIT_RULE

# What can go wrong in the nogil loop: said after it as a Python exception.
cdef enum:
    FAILED_MEMORY = 1
    FAILED_DATA = 2       # an index or offset outside its buffer, a column not given
    FAILED_OFFSETS = 3    # more than 2 GiB of sentences in one batch

cdef int64_t MAX_AMOUNT = 1000000000000  # engine/schema.py MAX_AMOUNT
cdef int64_t FIRST_DAY = -719162    # 0001-01-01, days since 1970-01-01: Python's dates
cdef int64_t LAST_DAY = 2932896     # 9999-12-31

cdef tuple _NAME_BYTES = tuple(name.encode() for name in COLUMNS)
cdef bytes _name
cdef const char* NAMES[NSLOTS]
for _i in range(NSLOTS):
    _name = _NAME_BYTES[_i]
    NAMES[_i] = _name


cdef struct Column:
    bint given
    const int64_t* ints        # int64 / timestamp values, at the array's offset
    const uint8_t* bits        # boolean values
    int64_t bits_at
    const int32_t* off32       # string (or list) offsets, at the strings' offset
    const int64_t* off64       # large_string (or large_list) offsets
    int64_t strings            # how many strings the offsets delimit
    const uint8_t* data        # the strings' bytes (a list: none; data_length = items)
    int64_t data_length
    const uint8_t* index       # dictionary indices, at the indices' offset; NULL: row = string
    int index_width
    const uint8_t* valid       # validity bitmap; NULL: no null
    int64_t valid_at
    const uint8_t* entry_valid  # the dictionary entries' validity; NULL: no null entry
    int64_t entry_valid_at


cdef struct Out:
    uint8_t* buf
    int64_t length
    int64_t capacity
    int failed


cdef struct Day:
    bint null
    int64_t day                # since 1970-01-01 (0 when null)
    int64_t year
    const uint8_t* text
    int64_t text_length
    uint8_t buf[16]


cdef struct Odd:               # dates outside years 1-9999, as Arrow writes them (from Python)
    const int64_t* days        # ascending
    const int64_t* offsets
    const uint8_t* data
    const int64_t* years
    int64_t count
    int64_t* missing           # days met that are not in the table, for Python to make
    int64_t missed
    int64_t missing_capacity


cdef struct Vocab:
    int slot[4]
    int count[4]
    const uint8_t* value[4][MAX_ENUM_VALUES]
    int64_t value_length[4][MAX_ENUM_VALUES]
    const uint8_t* joined[4]
    int64_t joined_length[4]


cdef struct PlaceTables:
    bint known
    const int64_t* region_offsets
    const uint8_t* region_data
    int64_t regions
    const int64_t* scheme_offsets
    const uint8_t* scheme_data
    int64_t schemes
    const int32_t* grid        # [regions, schemes, years]: group, -1 none
    int64_t first_year
    int64_t years
    const int32_t* group_first
    const int32_t* later_start
    const int32_t* later_count
    const int64_t* later_day
    const int32_t* later_index
    const int64_t* declared_offsets
    const uint8_t* declared_data
    const int64_t* id_offsets
    const uint8_t* id_data
    int64_t policies


cdef const uint8_t* address(object buf, int64_t need, list keep) except? NULL:
    """The start of a buffer (a pa.Buffer, numpy array or bytes) of at least `need` bytes,
    kept alive in `keep`; NULL for None. ValueError when it is shorter."""
    cdef Py_buffer view
    cdef const uint8_t* p
    if buf is None:
        if need > 0:
            raise ValueError("a buffer is missing")
        return NULL
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if view.len < need:
            raise ValueError(f"a buffer of {view.len} bytes where {need} are read")
        p = <const uint8_t*>view.buf
    finally:
        PyBuffer_Release(&view)
    keep.append(buf)
    return p


cdef int64_t buffer_length(object buf) except -1:
    cdef Py_buffer view
    if buf is None:
        return 0
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return view.len
    finally:
        PyBuffer_Release(&view)


cdef class Columns:
    """The claim (and result) columns of one batch of `rows` rows, by slot (COLUMNS): set
    from Python with a bounded number of calls per column, read by `sentences`."""
    cdef Column col[NSLOTS]
    cdef int64_t rows
    cdef list keep

    def __init__(self, int64_t rows):
        self.rows = rows
        self.keep = []
        cdef int k
        for k in range(NSLOTS):
            self.col[k].given = False
            self.col[k].ints = NULL
            self.col[k].bits = NULL
            self.col[k].off32 = NULL
            self.col[k].off64 = NULL
            self.col[k].data = NULL
            self.col[k].index = NULL
            self.col[k].valid = NULL
            self.col[k].entry_valid = NULL
            self.col[k].strings = 0
            self.col[k].data_length = 0

    cdef Column* slot(self, int k) except NULL:
        if not 0 <= k < NSLOTS:
            raise IndexError(f"no column slot {k}")
        self.col[k].given = True
        return &self.col[k]

    def validity(self, int k, buf, int64_t at, int64_t count):
        """The validity bitmap of `count` rows from bit `at` (None: no null)."""
        cdef Column* c
        c = self.slot(k)
        if k != ITEMS and count < self.rows:
            raise ValueError(f"column {COLUMNS[k]} has {count} rows, the results {self.rows}")
        c.valid = NULL
        if buf is not None:
            c.valid = address(buf, (at + count + 7) // 8, self.keep)
        c.valid_at = at

    def ints(self, int k, buf, int64_t at):
        """int64 values (a timestamp's too) from element `at`, one per row."""
        cdef Column* c
        c = self.slot(k)
        c.ints = <const int64_t*>address(buf, (at + self.rows) * 8, self.keep) + at

    def bools(self, int k, buf, int64_t at):
        """A boolean column's value bits from bit `at`, one per row."""
        cdef Column* c
        c = self.slot(k)
        c.bits = address(buf, (at + self.rows + 7) // 8, self.keep)
        c.bits_at = at

    def strings(self, int k, offsets, int64_t at, bint large, data, int64_t count):
        """`count` strings: their offsets from element `at` (int64 if `large`) into `data`;
        a dictionary column's entries (its `indices` given first), else one per row."""
        cdef Column* c
        c = self.slot(k)
        if k != ITEMS and c.index == NULL and count < self.rows:  # a dictionary's entries: any number
            raise ValueError(f"column {COLUMNS[k]} has {count} rows, the results {self.rows}")
        if large:
            c.off64 = <const int64_t*>address(offsets, (at + count + 1) * 8, self.keep) + at
            c.off32 = NULL
        else:
            c.off32 = <const int32_t*>address(offsets, (at + count + 1) * 4, self.keep) + at
            c.off64 = NULL
        c.strings = count
        c.data = address(data, 0, self.keep)
        c.data_length = buffer_length(data)

    def lists(self, int k, offsets, int64_t at, bint large, int64_t items):
        """A list column's offsets (one list per row) into `items` list items."""
        cdef Column* c
        c = self.slot(k)
        c.off32, c.off64 = NULL, NULL
        if large:
            c.off64 = <const int64_t*>address(offsets, (at + self.rows + 1) * 8, self.keep) + at
        else:
            c.off32 = <const int32_t*>address(offsets, (at + self.rows + 1) * 4, self.keep) + at
        c.strings = self.rows
        c.data_length = items

    def indices(self, int k, buf, int64_t at, int width):
        """Dictionary indices of `width` bytes from element `at`, one per row: each names one
        of the strings (the dictionary's entries) given by `strings`."""
        cdef Column* c
        if width not in (1, 2, 4, 8):
            raise ValueError(f"dictionary indices of {width} bytes")
        c = self.slot(k)
        c.index = address(buf, (at + self.rows) * width, self.keep) + at * width
        c.index_width = width

    def entry_validity(self, int k, buf, int64_t at, int64_t count):
        """The validity of the dictionary's `count` entries from bit `at` (None: no null)."""
        cdef Column* c
        c = self.slot(k)
        c.entry_valid = NULL
        if buf is not None:
            c.entry_valid = address(buf, (at + count + 7) // 8, self.keep)
        c.entry_valid_at = at


cdef class Vocabulary:
    """The enum columns INVALID_VALUE checks and their values (engine/schema.py), made once."""
    cdef Vocab v
    cdef list keep

    def __init__(self, list enums):
        """`enums`: (slot, [value bytes]) for each of the four enum columns."""
        if len(enums) != 4:
            raise ValueError("four enum columns")
        self.keep = []
        cdef int e, j
        for e, (slot, values) in enumerate(enums):
            if not 0 <= slot < NSLOTS or len(values) > MAX_ENUM_VALUES:
                raise ValueError(f"enum column {slot} with {len(values)} values")
            self.v.slot[e] = slot
            self.v.count[e] = len(values)
            for j, value in enumerate(values):
                value = bytes(value)
                self.keep.append(value)
                self.v.value[e][j] = value
                self.v.value_length[e][j] = len(value)
            joined = b", ".join(values)
            self.keep.append(joined)
            self.v.joined[e] = joined
            self.v.joined_length[e] = len(joined)


cdef class Places:
    """Per policy set: (region, scheme, year) -> the year's versions, as detail.py's
    `_versions_table` has them, and per policy its id and what its year declares."""
    cdef PlaceTables t
    cdef list keep

    def __init__(self, region_offsets, region_data, scheme_offsets, scheme_data, grid, int64_t first_year,
                 group_first, later_start, later_count, later_day, later_index,
                 declared_offsets, declared_data, id_offsets, id_data):
        self.keep = []
        cdef int64_t regions = len(region_offsets) - 1, schemes = len(scheme_offsets) - 1
        cdef int64_t policies = len(id_offsets) - 1, groups = len(group_first), later = len(later_day)
        if grid.shape[0] != regions or grid.shape[1] != schemes or len(declared_offsets) != policies + 1:
            raise ValueError("the place tables do not agree")
        self.t.known = policies > 0
        self.t.regions, self.t.schemes, self.t.policies = regions, schemes, policies
        self.t.first_year, self.t.years = first_year, grid.shape[2]
        self.t.region_offsets = <const int64_t*>address(np.ascontiguousarray(region_offsets, np.int64),
                                                        (regions + 1) * 8, self.keep)
        self.t.region_data = address(region_data, 0, self.keep)
        self.t.scheme_offsets = <const int64_t*>address(np.ascontiguousarray(scheme_offsets, np.int64),
                                                        (schemes + 1) * 8, self.keep)
        self.t.scheme_data = address(scheme_data, 0, self.keep)
        self.t.grid = <const int32_t*>address(np.ascontiguousarray(grid, np.int32),
                                              regions * schemes * grid.shape[2] * 4, self.keep)
        self.t.group_first = <const int32_t*>address(np.ascontiguousarray(group_first, np.int32), groups * 4, self.keep)
        self.t.later_start = <const int32_t*>address(np.ascontiguousarray(later_start, np.int32), groups * 4, self.keep)
        self.t.later_count = <const int32_t*>address(np.ascontiguousarray(later_count, np.int32), groups * 4, self.keep)
        self.t.later_day = <const int64_t*>address(np.ascontiguousarray(later_day, np.int64), later * 8, self.keep)
        self.t.later_index = <const int32_t*>address(np.ascontiguousarray(later_index, np.int32), later * 4, self.keep)
        self.t.declared_offsets = <const int64_t*>address(np.ascontiguousarray(declared_offsets, np.int64),
                                                          (policies + 1) * 8, self.keep)
        self.t.declared_data = address(declared_data, 0, self.keep)
        self.t.id_offsets = <const int64_t*>address(np.ascontiguousarray(id_offsets, np.int64), (policies + 1) * 8,
                                                    self.keep)
        self.t.id_data = address(id_data, 0, self.keep)
        # every index the lookups follow stays inside its table
        cdef const int32_t[::1] g = np.ascontiguousarray(grid, np.int32).reshape(-1)
        cdef const int32_t[::1] f = np.ascontiguousarray(group_first, np.int32)
        cdef const int32_t[::1] s = np.ascontiguousarray(later_start, np.int32)
        cdef const int32_t[::1] c = np.ascontiguousarray(later_count, np.int32)
        cdef const int32_t[::1] w = np.ascontiguousarray(later_index, np.int32)
        cdef Py_ssize_t i
        for i in range(g.shape[0]):
            if not -1 <= g[i] < groups:
                raise ValueError("a place table group out of range")
        for i in range(groups):
            if not (0 <= f[i] < policies and 0 <= s[i] and 0 <= c[i] and s[i] + c[i] <= later):
                raise ValueError("a place table version out of range")
        for i in range(later):
            if not 0 <= w[i] < policies:
                raise ValueError("a place table version out of range")


# ---- writing ----------------------------------------------------------------------------

cdef inline void put(Out* o, const void* p, int64_t k) noexcept nogil:
    """Append k bytes, growing the buffer (doubling) as needed; on failure mark `o` failed."""
    cdef int64_t capacity
    cdef uint8_t* grown
    if k <= 0 or o.failed:
        return
    if o.length + k > o.capacity:
        capacity = o.capacity * 2 if o.capacity else 256
        while capacity < o.length + k:
            capacity *= 2
        grown = <uint8_t*>realloc(o.buf, capacity)
        if grown == NULL:
            o.failed = FAILED_MEMORY
            return
        o.buf, o.capacity = grown, capacity
    memcpy(o.buf + o.length, p, k)
    o.length += k


cdef inline void put_s(Out* o, const char* s) noexcept nogil:
    put(o, s, strlen(s))


cdef inline void put_int(Out* o, int64_t v) noexcept nogil:
    """v in decimal, as Python's str writes an int (int64's minimum included)."""
    cdef char digits[24]
    cdef int i = 24
    cdef uint64_t u = (<uint64_t>0) - <uint64_t>v if v < 0 else <uint64_t>v
    while True:
        i -= 1
        digits[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        i -= 1
        digits[i] = 45  # '-'
    put(o, &digits[i], 24 - i)


cdef inline int64_t string_index(Column* c, int64_t row, Out* o) noexcept nogil:
    """The string of `row` (its dictionary entry or the row itself); -1 when null."""
    cdef int64_t j = row
    if not c.given:
        o.failed = FAILED_DATA
        return -1
    if c.valid != NULL and not bit_at(c.valid, c.valid_at + row):
        return -1
    if c.index != NULL:
        if c.index_width == 4:
            j = (<const int32_t*>c.index)[row]
        elif c.index_width == 1:
            j = (<const int8_t*>c.index)[row]
        elif c.index_width == 2:
            j = (<const int16_t*>c.index)[row]
        else:
            j = (<const int64_t*>c.index)[row]
        if j < 0 or j >= c.strings:
            o.failed = FAILED_DATA
            return -1
        if c.entry_valid != NULL and not bit_at(c.entry_valid, c.entry_valid_at + j):
            return -1
    return j


cdef inline bint span(Column* c, int64_t j, int64_t* start, int64_t* stop, Out* o) noexcept nogil:
    """Offsets j and j + 1 of a string (or list) column, checked against its data."""
    if c.off32 != NULL:
        start[0], stop[0] = c.off32[j], c.off32[j + 1]
    elif c.off64 != NULL:
        start[0], stop[0] = c.off64[j], c.off64[j + 1]
    else:
        o.failed = FAILED_DATA
        return False
    if start[0] < 0 or stop[0] < start[0] or stop[0] > c.data_length:
        o.failed = FAILED_DATA
        return False
    return True


cdef inline bint text_at(Column* c, int64_t row, const uint8_t** p, int64_t* length, Out* o) noexcept nogil:
    """The bytes of a string column at `row`; False when null."""
    cdef int64_t j = string_index(c, row, o), start, stop
    if j < 0 or not span(c, j, &start, &stop, o):
        return False
    p[0] = c.data + start
    length[0] = stop - start
    return True


cdef inline void put_text(Out* o, Column* c, int64_t row) noexcept nogil:
    """A string column's value at `row`, 'null' when null."""
    cdef const uint8_t* p
    cdef int64_t length
    if text_at(c, row, &p, &length, o):
        put(o, p, length)
    else:
        put_s(o, b"null")


cdef inline bint row_valid(Column* c, int64_t row, Out* o) noexcept nogil:
    """The row's own validity (not its dictionary entry's): what MISSING_FIELD reads."""
    if not c.given:
        o.failed = FAILED_DATA
        return True
    return c.valid == NULL or bit_at(c.valid, c.valid_at + row)


cdef inline bint int_at(Column* c, int64_t row, int64_t* v, Out* o) noexcept nogil:
    """An int64 column's value at `row`; False when null."""
    if not c.given or c.ints == NULL:
        o.failed = FAILED_DATA
        return False
    if c.valid != NULL and not bit_at(c.valid, c.valid_at + row):
        return False
    v[0] = c.ints[row]
    return True


cdef inline void put_int_or_null(Out* o, Column* c, int64_t row) noexcept nogil:
    cdef int64_t v
    if int_at(c, row, &v, o):
        put_int(o, v)
    else:
        put_s(o, b"null")


cdef inline void put_table(Out* o, const int64_t* offsets, const uint8_t* data, int64_t j) noexcept nogil:
    put(o, data + offsets[j], offsets[j + 1] - offsets[j])


cdef inline void two_digits(uint8_t* p, int64_t v) noexcept nogil:
    p[0] = <uint8_t>(48 + v // 10)
    p[1] = <uint8_t>(48 + v % 10)


cdef inline void day_of(Column* settle, int64_t row, Odd* odd, Day* d, Out* o) noexcept nogil:
    """settle_time's date at `row` as '%Y-%m-%d', its year and its day since 1970-01-01;
    null: 'null', no year, day 0. A date outside years 1-9999 comes from the `odd` table
    (Arrow's writing, made in Python), or is noted as missing there."""
    cdef int64_t micros, day, y, m, dd, lo, hi, mid
    if not int_at(settle, row, &micros, o):
        d.null, d.day, d.year = True, 0, 0
        d.text, d.text_length = <const uint8_t*>b"null", 4
        return
    day = day_of_micros(micros)
    d.null, d.day = False, day
    if FIRST_DAY <= day <= LAST_DAY:
        civil_from_days(day, &y, &m, &dd)  # as datetime.date
        d.year = y
        two_digits(d.buf, y // 100)
        two_digits(d.buf + 2, y % 100)
        d.buf[4] = 45
        two_digits(d.buf + 5, m)
        d.buf[7] = 45
        two_digits(d.buf + 8, dd)
        d.text, d.text_length = d.buf, 10
        return
    lo, hi = 0, odd.count
    while lo < hi:
        mid = (lo + hi) // 2
        if odd.days[mid] < day:
            lo = mid + 1
        else:
            hi = mid
    if lo < odd.count and odd.days[lo] == day:
        d.year = odd.years[lo]
        d.text, d.text_length = odd.data + odd.offsets[lo], odd.offsets[lo + 1] - odd.offsets[lo]
        return
    # not made yet: noted for Python (this call's output is then made again)
    if odd.missed == odd.missing_capacity:
        m = odd.missing_capacity * 2 if odd.missing_capacity else 64
        odd.missing = <int64_t*>realloc(odd.missing, m * 8)
        if odd.missing == NULL:
            o.failed = FAILED_MEMORY
            odd.missed = odd.missing_capacity = 0
            return
        odd.missing_capacity = m
    odd.missing[odd.missed] = day
    odd.missed += 1
    d.year = 0
    d.text, d.text_length = <const uint8_t*>b"?", 1


cdef inline void put_year(Out* o, Day* d) noexcept nogil:
    if d.null:
        put_s(o, b"null")
    else:
        put_int(o, d.year)


cdef inline int64_t code_of(Column* c, int64_t row, const int64_t* offsets, const uint8_t* data, int64_t count,
                            Out* o) noexcept nogil:
    """Which of `count` names (offsets/data) the string at `row` is; -1 none or null."""
    cdef const uint8_t* p
    cdef int64_t length, j
    if not text_at(c, row, &p, &length, o):
        return -1
    for j in range(count):
        if offsets[j + 1] - offsets[j] == length and memcmp(data + offsets[j], p, length) == 0:
            return j
    return -1


cdef inline int64_t version_of(Column* col, PlaceTables* t, int64_t row, Day* d, Out* o) noexcept nogil:
    """The policy version in force for the row (detail.py's `_versions`): its (region, scheme,
    year)'s first version, or the latest later one starting on or before its day; -1 none."""
    cdef int64_t r, s, y, g, which, k
    if not t.known or d.null:
        return -1
    r = code_of(&col[REGION], row, t.region_offsets, t.region_data, t.regions, o)
    s = code_of(&col[SCHEME], row, t.scheme_offsets, t.scheme_data, t.schemes, o)
    y = d.year - t.first_year
    if r < 0 or s < 0 or not 0 <= y < t.years:
        return -1
    g = t.grid[(r * t.schemes + s) * t.years + y]
    if g < 0:
        return -1
    which = t.group_first[g]
    for k in range(t.later_start[g], t.later_start[g] + t.later_count[g]):
        if d.day >= t.later_day[k]:
            which = t.later_index[k]
    return which


# ---- one inline function per sentence kind (engine/detail.py said the same in f-strings) ----

cdef inline bint missing_field(Out* o, Column* col, int64_t row) noexcept nogil:
    cdef int k, named = 0
    for k in range(REQUIRED):
        if not row_valid(&col[k], row, o):
            if named:
                put_s(o, b", ")
            put_s(o, NAMES[k])
            named += 1
    if not named:
        return False
    put_s(o, b" is null; a required field")
    return True


cdef inline bint invalid_value(Out* o, Column* col, Vocab* v, int64_t row) noexcept nogil:
    cdef int e, j, pieces = 0
    cdef const uint8_t* p
    cdef int64_t length
    cdef bint known
    for e in range(4):
        if not text_at(&col[v.slot[e]], row, &p, &length, o):
            continue
        known = False
        for j in range(v.count[e]):
            if v.value_length[e][j] == length and memcmp(v.value[e][j], p, length) == 0:
                known = True
                break
        if known:
            continue
        if pieces:
            put_s(o, b"; ")
        put_s(o, NAMES[v.slot[e]])
        put_s(o, b" '")
        put(o, p, length)
        put_s(o, b"' is not one of ")
        put(o, v.joined[e], v.joined_length[e])
        pieces += 1
    return pieces > 0


cdef inline int amounts_outside(Out* o, Column* col, int64_t row, bint low) noexcept nogil:
    """The amounts below 0 (`low`) or above 10^12 fen, each said once; how many."""
    cdef int k, pieces = 0
    cdef int64_t v
    for k in range(FIRST_AMOUNT, FIRST_AMOUNT + AMOUNTS):
        if not int_at(&col[k], row, &v, o) or not (v < 0 if low else v > MAX_AMOUNT):
            continue
        if pieces:
            put_s(o, b"; ")
        put_s(o, NAMES[k])
        put_s(o, b" ")
        put_int(o, v)
        put_s(o, b" < 0 (a reversal goes through the server's Reverse)" if low
              else b" > 10^12 fen, the largest claim amount")
        pieces += 1
    return pieces


cdef inline bint invalid_amount(Out* o, Column* col, int64_t row) noexcept nogil:
    return amounts_outside(o, col, row, True) > 0


cdef inline bint out_of_range(Out* o, Column* col, Odd* odd, int64_t row) noexcept nogil:
    cdef Day d
    if amounts_outside(o, col, row, False):
        return True
    day_of(&col[SETTLE_TIME], row, odd, &d, o)
    put_s(o, b"this claim would take the compliant total of person ")
    put_text(o, &col[PERSON_ID], row)
    put_s(o, b" (")
    put_text(o, &col[REGION], row)
    put_s(o, b", ")
    put_text(o, &col[SCHEME], row)
    put_s(o, b", ")
    put_year(o, &d)
    put_s(o, b") above 10^14 fen, the largest accumulated amount")
    return True


cdef inline bint amount_mismatch(Out* o, Column* col, int64_t row) noexcept nogil:
    cdef int64_t total = 0
    cdef int64_t p[4]
    p[0] = p[1] = p[2] = p[3] = 0
    cdef uint64_t s = 0
    cdef bint parts = True, has_total = int_at(&col[TOTAL], row, &total, o)
    cdef int k
    for k in range(4):
        if int_at(&col[SELF_FUNDED + k], row, &p[k], o):
            s += <uint64_t>p[k]   # wraps as Arrow's unchecked int64 add
        else:
            parts = False
    if has_total and parts and total != <int64_t>s:
        put_s(o, b"total_amount ")
        put_int(o, total)
        put_s(o, b" != ")
        put_int(o, <int64_t>s)
        put_s(o, b" = self_funded ")
        put_int(o, p[0])
        put_s(o, b" + over_limit ")
        put_int(o, p[1])
        put_s(o, b" + class_b_copay ")
        put_int(o, p[2])
        put_s(o, b" + in_scope ")
        put_int(o, p[3])
    else:
        put_s(o, b"in_scope_class_b_amount ")
        put_int_or_null(o, &col[CLASS_B], row)
        put_s(o, b" > in_scope_amount ")
        put_int_or_null(o, &col[IN_SCOPE], row)
    return True


cdef inline bint unknown_policy(Out* o, Column* col, Odd* odd, int64_t row) noexcept nogil:
    cdef Day d
    day_of(&col[SETTLE_TIME], row, odd, &d, o)
    put_s(o, b"no policy for region ")
    put_text(o, &col[REGION], row)
    put_s(o, b", scheme ")
    put_text(o, &col[SCHEME], row)
    put_s(o, b" on ")
    put(o, d.text, d.text_length)
    put_s(o, b" (settle_time's date picks the policy and its year)")
    return True


cdef inline void put_identities(Out* o, Column* col, int64_t row) noexcept nogil:
    """list<string> as 'a, b', a null item as 'null', an empty (or null) list as 'none'."""
    cdef Column* lists = &col[IDENTITIES]
    cdef int64_t start = o.length, first, stop, j
    if string_index(lists, row, o) >= 0 and span(lists, row, &first, &stop, o):
        for j in range(first, stop):
            if j > first:
                put_s(o, b", ")
            put_text(o, &col[ITEMS], j)
    if o.length == start:
        put_s(o, b"none")


cdef inline bint unknown_identity(Out* o, Column* col, PlaceTables* t, Odd* odd, int64_t row) noexcept nogil:
    cdef Day d
    cdef int64_t which
    day_of(&col[SETTLE_TIME], row, odd, &d, o)
    put_s(o, b"identities [")
    put_identities(o, col, row)
    put_s(o, b"] include a null item or one that no version of region ")
    put_text(o, &col[REGION], row)
    put_s(o, b", scheme ")
    put_text(o, &col[SCHEME], row)
    put_s(o, b", year ")
    put_year(o, &d)
    put_s(o, b" declares")
    which = version_of(col, t, row, &d, o)
    if which >= 0:
        put_s(o, b" (they declare: ")
        put_table(o, t.declared_offsets, t.declared_data, which)
        put_s(o, b")")
    return True


cdef inline bint duplicate_claim(Out* o, Column* col, int64_t row) noexcept nogil:
    put_s(o, b"claim_id ")
    put_text(o, &col[CLAIM_ID], row)
    put_s(o, b" came earlier in this call (the first row with it is settled or rejected on its own); "
             b"send a corrected claim in a later call")
    return True


cdef inline bint no_benefit_rule(Out* o, Column* col, PlaceTables* t, Odd* odd, int64_t row) noexcept nogil:
    cdef Day d
    cdef int64_t which
    cdef Column* referred = &col[REFERRED]
    cdef const uint8_t* p
    cdef int64_t length
    put_s(o, b"policy ")
    if text_at(&col[POLICY_ID], row, &p, &length, o):
        put(o, p, length)
    else:
        which = -1
        if t.known:
            day_of(&col[SETTLE_TIME], row, odd, &d, o)
            which = version_of(col, t, row, &d, o)
        if which >= 0:
            put_table(o, t.id_offsets, t.id_data, which)
        else:
            put_s(o, b"null")
    put_s(o, b" has no basic-layer rule for visit_type ")
    put_text(o, &col[VISIT_TYPE], row)
    put_s(o, b" at facility_level ")
    put_text(o, &col[FACILITY_LEVEL], row)
    put_s(o, b", locality ")
    put_text(o, &col[LOCALITY], row)
    if not referred.given or referred.bits == NULL:
        o.failed = FAILED_DATA
    elif (referred.valid == NULL or bit_at(referred.valid, referred.valid_at + row)) and \
            bit_at(referred.bits, referred.bits_at + row):
        put_s(o, b", referred true")
    else:  # null said as false, as bool(None)
        put_s(o, b", referred false")
    return True


cdef inline const uint8_t* pointer_or_null(const uint8_t[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] else NULL


def sentences(Columns columns not None, Vocabulary vocabulary not None, Places places,
              const int64_t[::1] rows, const int64_t[::1] kinds, const int64_t[::1] status_offsets, const uint8_t[::1] status_data,
              const int64_t[::1] odd_days, const int64_t[::1] odd_offsets, const uint8_t[::1] odd_data,
              const int64_t[::1] odd_years):
    """The sentence of each error row (`rows`, ascending, with their status `kinds`) of a batch:
    (int32 offsets [rows + 1], the bytes, a validity bitmap, the null count), ready for
    pa.StringArray.from_buffers; every other row null.

    `status_offsets`/`status_data`: per code, its "status NAME" text for a code past
    NO_BENEFIT_RULE. `odd_*`: dates outside years 1-9999 as Arrow writes them (day, text,
    year; days ascending). When a row needs such a date the table lacks, nothing is made:
    the days are returned instead (an int64 array), for the caller to add and call again.
    """
    cdef int64_t n = columns.rows, m = rows.shape[0], k, row, filled = 0, start, valid = 0, code
    cdef int64_t codes = status_offsets.shape[0] - 1
    cdef Column* col = columns.col
    cdef Vocab* v = &vocabulary.v
    cdef PlaceTables empty
    cdef PlaceTables* t = &places.t if places is not None else &empty
    cdef Out o
    cdef Odd odd
    cdef bint written
    cdef int64_t[::1] days
    cdef const uint8_t* status_text = pointer_or_null(status_data)
    empty.known = False
    if kinds.shape[0] != m or odd_offsets.shape[0] != odd_days.shape[0] + 1 or odd_years.shape[0] != odd_days.shape[0]:
        raise ValueError("rows, kinds and the odd-dates table do not agree")
    if codes < 0 or status_offsets[codes] > status_data.shape[0]:
        raise ValueError("the status texts do not agree")
    for k in range(codes):
        if not 0 <= status_offsets[k] <= status_offsets[k + 1]:
            raise ValueError("the status texts do not agree")
    for k in range(odd_days.shape[0]):
        if not 0 <= odd_offsets[k] <= odd_offsets[k + 1] <= odd_data.shape[0]:
            raise ValueError("the odd-dates table does not agree")
    offsets = np.empty(n + 1, dtype=np.int32)
    bitmap = np.zeros((n + 7) // 8, dtype=np.uint8)
    cdef int32_t[::1] off = offsets
    cdef uint8_t[::1] bits = bitmap
    odd.days = &odd_days[0] if odd_days.shape[0] else NULL
    odd.offsets = &odd_offsets[0]
    odd.data = pointer_or_null(odd_data)
    odd.years = &odd_years[0] if odd_years.shape[0] else NULL
    odd.count = odd_days.shape[0]
    odd.missing, odd.missed, odd.missing_capacity = NULL, 0, 0
    o.length, o.failed = 0, 0
    o.capacity = max(m * 160, 256)
    o.buf = <uint8_t*>malloc(o.capacity)
    if o.buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            for k in range(m):
                row = rows[k]
                if row < filled or row >= n or kinds[k] < 0 or kinds[k] >= codes:
                    o.failed = FAILED_DATA
                    break
                while filled <= row:
                    off[filled] = <int32_t>o.length
                    filled += 1
                start = o.length
                code = kinds[k]
                if code == MISSING_FIELD:
                    written = missing_field(&o, col, row)
                elif code == INVALID_VALUE:
                    written = invalid_value(&o, col, v, row)
                elif code == INVALID_AMOUNT:
                    written = invalid_amount(&o, col, row)
                elif code == AMOUNT_OUT_OF_RANGE:
                    written = out_of_range(&o, col, &odd, row)
                elif code == AMOUNT_MISMATCH:
                    written = amount_mismatch(&o, col, row)
                elif code == UNKNOWN_POLICY:
                    written = unknown_policy(&o, col, &odd, row)
                elif code == UNKNOWN_IDENTITY:
                    written = unknown_identity(&o, col, t, &odd, row)
                elif code == DUPLICATE_CLAIM:
                    written = duplicate_claim(&o, col, row)
                elif code == NO_BENEFIT_RULE:
                    written = no_benefit_rule(&o, col, t, &odd, row)
                else:  # a status this module does not know: "status NAME"
                    put(&o, status_text + status_offsets[code], status_offsets[code + 1] - status_offsets[code])
                    written = True
                if o.failed:
                    break
                if o.length > INT32_MAX:
                    o.failed = FAILED_OFFSETS
                    break
                if written:
                    bits[row >> 3] |= <uint8_t>(1 << (row & 7))
                    valid += 1
                else:
                    o.length = start
            if not o.failed:
                while filled <= n:
                    off[filled] = <int32_t>o.length
                    filled += 1
        if o.failed == FAILED_MEMORY:
            raise MemoryError()
        if o.failed == FAILED_DATA:
            raise ValueError("status_detail: a column's index or offset is outside its buffer, or a column "
                             "a sentence reads was not given")
        if o.failed == FAILED_OFFSETS:
            raise OverflowError("status_detail: more than 2 GiB of sentences in one batch")
        if odd.missed:
            missed = np.empty(odd.missed, dtype=np.int64)
            days = missed
            for k in range(odd.missed):
                days[k] = odd.missing[k]
            return missed
        data = PyBytes_FromStringAndSize(<const char*>o.buf, o.length)
    finally:
        free(o.buf)
        free(odd.missing)
    return offsets, data, bitmap, n - valid


cdef inline int64_t index_at(const uint8_t* index, int width, int64_t i) noexcept nogil:
    if width == 4:
        return (<const int32_t*>index)[i]
    if width == 1:
        return (<const int8_t*>index)[i]
    if width == 2:
        return (<const int16_t*>index)[i]
    return (<const int64_t*>index)[i]


cdef inline int32_t not_ok(const int32_t* index, int64_t start, int64_t stop, int32_t ok) noexcept nogil:
    """How many of index[start:stop] are not `ok` (an int32 count over a short block, which
    gcc vectorizes)."""
    cdef int32_t count = 0
    cdef const int32_t* p = index + start
    cdef int32_t k, length = <int32_t>(stop - start)
    for k in range(length):
        count += p[k] != ok
    return count


cdef struct Found:
    int64_t* rows
    int64_t* kinds
    int64_t count
    int64_t capacity
    bint failed


cdef inline void found(Found* f, int64_t row, int64_t code) noexcept nogil:
    """Append (row, code), growing both arrays (doubling); on failure mark `f` failed."""
    cdef int64_t capacity
    cdef int64_t* rows
    cdef int64_t* kinds
    if f.count == f.capacity:
        capacity = f.capacity * 2 if f.capacity else 1024
        rows = <int64_t*>realloc(f.rows, capacity * 8)
        if rows == NULL:
            f.failed = True
            return
        f.rows = rows
        kinds = <int64_t*>realloc(f.kinds, capacity * 8)
        if kinds == NULL:
            f.failed = True
            return
        f.kinds, f.capacity = kinds, capacity
    f.rows[f.count] = row
    f.kinds[f.count] = code
    f.count += 1


def error_rows(indices, int64_t at, int width, validity, int64_t valid_at, int64_t n,
               const int64_t[::1] remap, int64_t ok):
    """The rows of a dictionary-encoded status column (`n` indices of `width` bytes from
    element `at`, validity bitmap from bit `valid_at`, None: no null) whose code is not `ok`,
    and their codes (`remap`: one code per dictionary entry, then the code of null), as two
    int64 arrays: one pass over the indices, blocks of 16 all ok skipped on one vectorized
    count when one entry is ok and none is null (the settler's results)."""
    if width not in (1, 2, 4, 8):
        raise ValueError(f"dictionary indices of {width} bytes")
    cdef list keep = []
    cdef const uint8_t* index = address(indices, (at + n) * width, keep) + at * width
    cdef const uint8_t* valid = NULL
    if validity is not None:
        valid = address(validity, (valid_at + n + 7) // 8, keep)
    cdef int64_t entries = remap.shape[0] - 1, i, j, b, end, oks = 0
    cdef bint bad = False
    if entries < 0:
        raise ValueError("remap has no code for null")
    cdef const int64_t* codes = &remap[0]
    cdef const int32_t* index32 = <const int32_t*>index
    cdef int32_t ok_entry = -1
    for j in range(entries):
        if codes[j] == ok:
            oks += 1
            ok_entry = <int32_t>j
    if oks != 1 or width != 4 or valid != NULL:
        ok_entry = -1  # not the usual case: each row through remap
    cdef Found f
    f.rows, f.kinds, f.count, f.capacity, f.failed = NULL, NULL, 0, 0, False
    try:
        with nogil:
            if ok_entry >= 0:
                i = 0
                while i < n and not bad:
                    end = min(i + 16, n)
                    if not_ok(index32, i, end, ok_entry):
                        for b in range(i, end):
                            if index32[b] != ok_entry:
                                j = index32[b]
                                if j < 0 or j >= entries:
                                    bad = True
                                    break
                                found(&f, b, codes[j])
                    i = end
            else:
                for i in range(n):
                    if valid != NULL and not bit_at(valid, valid_at + i):
                        j = entries
                    else:
                        j = index_at(index, width, i)
                        if j < 0 or j >= entries:
                            bad = True
                            break
                    if codes[j] != ok:
                        found(&f, i, codes[j])
        if bad:
            raise ValueError("a status index outside its dictionary")
        if f.failed:
            raise MemoryError()
        rows_out = np.empty(f.count, dtype=np.int64)
        kinds_out = np.empty(f.count, dtype=np.int64)
        if f.count:
            memcpy(<void*>cnp.PyArray_DATA(rows_out), f.rows, f.count * 8)
            memcpy(<void*>cnp.PyArray_DATA(kinds_out), f.kinds, f.count * 8)
    finally:
        free(f.rows)
        free(f.kinds)
    return rows_out, kinds_out
