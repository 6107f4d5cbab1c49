# cython: language_level=3, cdivision=True, nonecheck=False, embedsignature=True
# boundscheck, wraparound and initializedcheck come from setup.py: off, or on with MEDSETTLE_BOUNDSCHECK=1.
"""Column passes around the kernel: Arrow buffers to the kernel's arrays, and its outputs
and state rows to result and accumulator columns.

One pass each over Arrow buffers or the state table: numpy would take several
passes and temporaries per column.
"""
import numpy as np
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memcpy, memcmp
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t

from ._bits cimport bit_at
from ._calendar cimport civil_from_days, day_of_micros
from ._tables cimport PolicyRow, OK, ACC_FIELDS_C


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
    """Calendar year of a timestamp[us] (proleptic Gregorian)."""
    cdef int64_t y, m, d
    civil_from_days(day_of_micros(micros), &y, &m, &d)
    return <int32_t>y


def calendar_years(const int64_t[::1] micros, int32_t[::1] out):
    """Calendar year of each timestamp[us]: civil_year over an array, so that tests can check
    the arithmetic policy_rows uses against Python's calendar."""
    cdef Py_ssize_t n = out.shape[0], i
    with nogil:
        for i in range(n):
            out[i] = civil_year(micros[i])



cdef inline int64_t year_start(int64_t y) noexcept nogil:
    """Microseconds of 1 January of year y, 00:00 (days-from-civil, proleptic Gregorian)."""
    cdef int64_t yy = y - 1  # January counts with the year before, in a March-based year
    cdef int64_t era = (yy if yy >= 0 else yy - 399) // 400
    cdef int64_t yoe = yy - era * 400
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + 306
    return (era * 146097 + doe - 719468) * (86400 * <int64_t>1000000)


cdef class PolicyLookup:
    """The version in force per row (spec section 5), from (region code, scheme code,
    settle_time): the year's group of versions from a table, then the latest version whose
    effective_from (00:00 local) is on or before settle_time; -1 none."""
    cdef const int32_t[:, :, ::1] table      # [regions, schemes, years]: the year's first version, -1 none
    cdef int32_t first_year
    cdef const int32_t[::1] version_start    # per policy: its year's versions in version_from / _policy
    cdef const int32_t[::1] version_count
    cdef const int64_t[::1] version_from     # micros of 00:00 of effective_from, ascending within a year
    cdef const int32_t[::1] version_policy

    def __init__(self, const int32_t[:, :, ::1] table, int32_t first_year, const int32_t[::1] version_start,
                 const int32_t[::1] version_count, const int64_t[::1] version_from,
                 const int32_t[::1] version_policy):
        self.table, self.first_year = table, first_year
        self.version_start, self.version_count = version_start, version_count
        self.version_from, self.version_policy = version_from, version_policy

    def rows(self, const int32_t[::1] region, const int32_t[::1] scheme, const int64_t[::1] micros,
             int32_t[::1] policy, int32_t[::1] key_policy):
        """`policy`: the version in force; `key_policy`: its year's first version, under which
        the row's accumulator key is kept (-1 both when none: negative codes, a year outside
        the table, or a date before the year's first version).

        Claims come mostly in time order, so the year of the row before is tried
        first: two compares instead of the calendar arithmetic.
        """
        cdef Py_ssize_t n = policy.shape[0], i
        cdef int32_t y = 0, years = <int32_t>self.table.shape[2], first, v, k, end
        cdef int64_t lo = 1, hi = 0, t
        with nogil:
            for i in range(n):
                policy[i] = -1
                key_policy[i] = -1
                if region[i] < 0 or scheme[i] < 0:
                    continue
                t = micros[i]
                if not (lo <= t < hi):
                    y = civil_year(t)
                    lo = year_start(y)
                    hi = year_start(y + 1)
                if not (0 <= y - self.first_year < years):
                    continue
                first = self.table[region[i], scheme[i], y - self.first_year]
                if first < 0:
                    continue
                k = self.version_start[first]
                end = k + self.version_count[first]
                v = -1
                while k < end and self.version_from[k] <= t:
                    v = self.version_policy[k]
                    k += 1
                if v >= 0:
                    policy[i] = v
                    key_policy[i] = first


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
                   int64_t[::1] compliant_personal, int32_t[::1] layer_offsets,
                   const int64_t[::1] deductible, int64_t[:, ::1] totals):
    """The derived columns of spec section 3 from the kernel's outputs; returns how
    many layer_pays entries there are (layers that paid more than 0), with
    `layer_offsets` [n + 1] their list offsets. Error rows: no policy, all 0.

    Unless `totals` has no rows, each ok row's paid amounts are added to totals[policy + 1]
    in schema.PAID_TOTALS order (the five funds, fund_pay_total, personal_pay,
    compliant_personal_pay, deductible_applied), here, where they are in registers: a
    summary's per-policy sums then need no pass of their own over nine columns. The two
    cases are two loops written out, so that results without totals cost what they did
    (callgrind, 200k claims: a test per row of whether totals are kept cost 0.8 M
    instructions, inline helpers for the shared lines 0.6-1.2 M)."""
    cdef Py_ssize_t n = status.shape[0], i, j
    cdef int64_t nlay = layer_pay.shape[1], s, v, entries = 0, rows = totals.shape[0]
    cdef int64_t* t
    cdef bint bad = False
    if rows and (totals.shape[1] != 9 or deductible.shape[0] != n):
        raise ValueError("result_columns: totals must have the 9 columns of schema.PAID_TOTALS")
    with nogil:
        layer_offsets[0] = 0
        if not rows:
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
        else:
            for i in range(n):
                if status[i] != OK:
                    policy_out[i] = -1
                    fund_total[i] = 0
                    personal[i] = 0
                    compliant_personal[i] = 0
                else:
                    if <uint64_t>(policy[i] + 1) >= <uint64_t>rows:
                        bad = True
                        break
                    policy_out[i] = policy[i]
                    t = &totals[policy[i] + 1, 0]
                    s = 0
                    for j in range(5):
                        v = fund_pay[j, i]
                        s += v
                        t[j] += v
                    fund_total[i] = s
                    personal[i] = total[i] - s
                    compliant_personal[i] = compliant[i] - s
                    t[5] += s
                    t[6] += total[i] - s
                    t[7] += compliant[i] - s
                    t[8] += deductible[i]
                    for j in range(nlay):
                        if layer_pay[i, j] > 0:
                            entries += 1
                layer_offsets[i + 1] = <int32_t>entries
    if bad:
        raise ValueError(f"result_columns: row {i}'s policy {policy[i]} is outside the totals")
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


cdef inline int64_t foreign_entries(const int64_t[:, ::1] aside, int64_t a, int64_t b, int64_t width,
                                    int64_t code_base, int64_t* column, int64_t* position, int64_t* paid,
                                    int64_t* charged) noexcept nogil:
    """The carried-in entries of one key (aside rows a..b, sorted by column then field) whose
    column is past the compiled ones (width + k: no version of the year names them); returns
    how many, and when `column` is not NULL writes each one's code (code_base + k) and fields."""
    cdef int64_t q, f, count = 0, last = -1
    for q in range(a, b):
        if aside[q, 0] < width:
            continue
        if aside[q, 0] != last:
            last = aside[q, 0]
            count += 1
            if column != NULL:
                column[count - 1] = code_base + last - width
                position[count - 1] = 0
                paid[count - 1] = 0
                charged[count - 1] = 0
        if column != NULL:
            f = aside[q, 1]
            if f == 0:
                position[count - 1] = aside[q, 2]
            elif f == 1:
                paid[count - 1] = aside[q, 2]
            else:
                charged[count - 1] = aside[q, 2]
    return count


cdef class ClosingAccumulators:
    """The closing accumulators' columns (spec section 4) of a call's keys, in slot order.

    Two passes over the state rows: the first finds the keys that hold
    anything and sizes the columns, the second fills them; so a year's millions
    of keys cost no temporary the size of the table. A key holds nothing when
    its head and every column are 0; an entry is a column with any field not 0.
    """
    cdef const int64_t[::1] starts
    cdef const uint8_t[::1] arena
    cdef const int64_t[:, ::1] state
    cdef const int64_t[:, ::1] state_index
    cdef const PolicyRow[::1] policies
    cdef const int64_t[::1] aside_slot
    cdef const int64_t[:, ::1] aside
    cdef int64_t acc_width
    cdef int32_t[::1] entries_of     # per slot: its entries, -1 when it holds nothing
    cdef readonly object key_policy  # int32 per held key: its policy index
    cdef readonly object person_offsets, person_data, admissions, compliant_total
    cdef readonly object entry_offsets, column, position, paid, deductible_charged
    cdef readonly int64_t held

    def __init__(self, const int64_t[::1] starts, const uint8_t[::1] arena, const int64_t[:, ::1] state,
                 const int64_t[:, ::1] state_index, const PolicyRow[::1] policies, int64_t acc_width,
                 const int64_t[::1] aside_slot, const int64_t[:, ::1] aside):
        """Keys: `starts` / `arena` of the key table (4 bytes of policy, then the person id);
        `aside_slot` / `aside` ([k, 3]: column, field, value) are the carried values the rows
        do not keep, sorted by slot; an entry's `column` is policy * acc_width + column."""
        self.starts, self.arena, self.state, self.state_index = starts, arena, state, state_index
        self.policies, self.acc_width, self.aside_slot, self.aside = policies, acc_width, aside_slot, aside
        count = starts.shape[0] - 1
        self.entries_of = np.empty(count, dtype=np.int32)
        policy_of = np.empty(count, dtype=np.int32)
        n_entries, person_bytes = self._count(policy_of)
        kept = np.asarray(self.entries_of) >= 0
        self.key_policy = policy_of[kept]
        held = self.held
        self.person_offsets = np.empty(held + 1, dtype=np.int64)
        self.person_data = np.empty(max(person_bytes, 1), dtype=np.uint8)
        self.admissions = np.empty(held, dtype=np.int64)
        self.compliant_total = np.empty(held, dtype=np.int64)
        self.entry_offsets = np.empty(held + 1, dtype=np.int32)
        self.column, self.position, self.paid, self.deductible_charged = (
            np.empty(n_entries, dtype=np.int64) for _ in range(4))
        self._fill(policy_of, self.person_offsets, self.person_data, self.admissions, self.compliant_total,
                   self.entry_offsets, self.column, self.position, self.paid, self.deductible_charged)

    cdef tuple _count(self, int32_t[::1] policy_out):
        cdef Py_ssize_t count = policy_out.shape[0], i
        cdef int64_t a = 0, b, j, n, held = 0, entries = 0, person_bytes = 0, width = self.state.shape[1]
        cdef int32_t p
        cdef int64_t v[ACC_FIELDS_C]
        cdef const int64_t* row
        with nogil:
            for i in range(count):
                memcpy(&p, &self.arena[0] + self.starts[i], 4)
                policy_out[i] = p
                a = aside_start(self.aside_slot, a, i)
                b = aside_start(self.aside_slot, a, i + 1)
                row = &self.state[0, 0] + i * width
                n = 0
                for j in range(self.policies[p].acc_width):
                    column_values(row, &self.state_index[p, 0], j, self.aside, a, b, v)
                    if v[0] != 0 or v[1] != 0 or v[2] != 0:
                        n += 1
                n += foreign_entries(self.aside, a, b, self.acc_width, 0, NULL, NULL, NULL, NULL)
                if n == 0 and row[0] == 0 and row[1] == 0:
                    self.entries_of[i] = -1
                else:
                    self.entries_of[i] = <int32_t>n
                    held += 1
                    entries += n
                    person_bytes += self.starts[i + 1] - self.starts[i] - 4
        self.held = held
        return entries, person_bytes

    cdef void _fill(self, const int32_t[::1] policy, int64_t[::1] person_offsets, uint8_t[::1] person_data,
                    int64_t[::1] admissions, int64_t[::1] compliant_total, int32_t[::1] entry_offsets,
                    int64_t[::1] column, int64_t[::1] position, int64_t[::1] paid, int64_t[::1] charged):
        cdef Py_ssize_t count = policy.shape[0], i
        cdef int64_t a = 0, b, j, k = 0, e = 0, length, width = self.state.shape[1]
        cdef int32_t p
        cdef int64_t v[ACC_FIELDS_C]
        cdef const int64_t* row
        cdef bint any_entries = column.shape[0] > 0
        cdef int64_t* col_p = &column[0] if any_entries else NULL
        cdef int64_t* pos_p = &position[0] if any_entries else NULL
        cdef int64_t* paid_p = &paid[0] if any_entries else NULL
        cdef int64_t* charged_p = &charged[0] if any_entries else NULL
        with nogil:
            person_offsets[0] = 0
            entry_offsets[0] = 0
            for i in range(count):
                if self.entries_of[i] < 0:
                    continue
                p = policy[i]
                a = aside_start(self.aside_slot, a, i)
                b = aside_start(self.aside_slot, a, i + 1)
                length = self.starts[i + 1] - self.starts[i] - 4
                if length > 0:
                    memcpy(&person_data[0] + person_offsets[k], &self.arena[0] + self.starts[i] + 4, length)
                person_offsets[k + 1] = person_offsets[k] + length
                row = &self.state[0, 0] + i * width
                admissions[k] = row[0]
                compliant_total[k] = row[1]
                for j in range(self.policies[p].acc_width):
                    column_values(row, &self.state_index[p, 0], j, self.aside, a, b, v)
                    if v[0] != 0 or v[1] != 0 or v[2] != 0:
                        column[e] = p * self.acc_width + j
                        position[e] = v[0]
                        paid[e] = v[1]
                        charged[e] = v[2]
                        e += 1
                if b > a:
                    e += foreign_entries(self.aside, a, b, self.acc_width, self.policies.shape[0] * self.acc_width,
                                         col_p + e, pos_p + e, paid_p + e, charged_p + e)
                k += 1
                entry_offsets[k] = <int32_t>e


# --------------------------------------------------------------------------- the command line's summary

ctypedef fused index_t:
    int8_t
    int16_t
    int32_t
    int64_t


def dictionary_codes(const index_t[::1] indices, const uint8_t[::1] validity, int64_t offset,
                     const int32_t[::1] remap, int32_t[::1] out):
    """out[i] = remap[indices[i]]: a dictionary array's codes in the summary's own numbering
    (`remap`: one code per dictionary entry, then the code of null, taken where bit offset + i
    of `validity` is 0; an empty `validity`: no nulls)."""
    cdef Py_ssize_t n = out.shape[0], i
    cdef int32_t null_code = remap[remap.shape[0] - 1]
    cdef bint has_nulls = validity.shape[0] > 0
    with nogil:
        for i in range(n):
            if has_nulls and not bit_at(&validity[0], offset + i):
                out[i] = null_code
            else:
                out[i] = remap[indices[i]]


def summary_tally(const int32_t[::1] policy, const int32_t[::1] status, int32_t ok, list amounts,
                  const uint8_t[::1] cap_bits, int64_t cap_offset, const uint8_t[::1] gather_policy,
                  int64_t[:, ::1] counts, int64_t[:, :, ::1] sums, int64_t[::1] gathered):
    """One pass over a results batch's rows, by (policy, status) code: counts[p, s] += 1,
    sums[p, s, j] += amounts[j][i] and sums[p, s, len(amounts)] += the row's cap_hit bit
    (bit cap_offset + i of `cap_bits`). Writes to `gathered` the rows whose person the key
    table may not count (status not `ok`, or a policy whose `gather_policy` is 1) and
    returns how many."""
    cdef Py_ssize_t n = policy.shape[0], i
    cdef int64_t k = 0, width = len(amounts)
    cdef int32_t p, s
    cdef const int64_t** cols
    cdef int64_t* out
    cdef int64_t* count_base
    cdef int64_t* sum_base
    cdef int32_t policies = <int32_t>counts.shape[0], statuses = <int32_t>counts.shape[1]
    cdef bint bad = False
    if not (status.shape[0] == n and gathered.shape[0] >= n and sums.shape[0] == counts.shape[0]
            and sums.shape[1] == counts.shape[1] and sums.shape[2] == width + 1
            and gather_policy.shape[0] >= counts.shape[0] and cap_bits.shape[0] * 8 >= cap_offset + n):
        raise ValueError("summary_tally: inconsistent shapes")
    if n == 0:
        return 0
    count_base = &counts[0, 0]
    sum_base = &sums[0, 0, 0]
    keep = []  # the memoryviews whose pointers `cols` holds
    cols = <const int64_t**>PyMem_Malloc(max(width, 1) * sizeof(int64_t*))
    if cols == NULL:
        raise MemoryError()
    try:
        amount_pointers(amounts, n, cols, keep, "summary_tally")
        with nogil:
            for i in range(n):
                p = policy[i]
                s = status[i]
                if <uint32_t>p >= <uint32_t>policies or <uint32_t>s >= <uint32_t>statuses:
                    bad = True
                    break
                out = add_row(count_base, sum_base, cols, width, p * statuses + s, i)
                out[width] += bit_at(&cap_bits[0], cap_offset + i)
                if s != ok or gather_policy[p]:
                    gathered[k] = i
                    k += 1
        if bad:
            raise ValueError(f"summary_tally: code ({p}, {s}) outside the counts")
    finally:
        PyMem_Free(cols)
    return k


cdef inline int64_t* add_row(int64_t* count_base, int64_t* sum_base, const int64_t** cols, int64_t width,
                             int64_t g, Py_ssize_t i) noexcept nogil:
    """Row i under code g: counts[g] += 1 and its amounts added to sums[g], which is returned
    (its cap-hit column follows the amounts)."""
    cdef int64_t j
    cdef int64_t* out = sum_base + g * (width + 1)
    count_base[g] += 1
    for j in range(width):
        out[j] += cols[j][i]
    return out


cdef int amount_pointers(list amounts, Py_ssize_t n, const int64_t** cols, list keep, str who) except -1:
    """cols[j] = the data of amounts[j] (int64, n rows each), whose memoryviews `keep` holds."""
    cdef const int64_t[::1] column
    for j in range(len(amounts)):
        column = amounts[j]
        if column.shape[0] != n:
            raise ValueError(f"{who}: an amount column of another length")
        keep.append(column)
        cols[j] = &column[0]
    return 0


def chunk_tally(const int32_t[::1] policy, const int8_t[::1] status, int8_t ok,
                const uint8_t[::1] cap_hit, const uint8_t[::1] versioned, const int64_t[::1] slot,
                const uint64_t[::1] version_bit, uint64_t[::1] version_bits,
                int64_t[:, ::1] counts, int64_t[:, :, ::1] sums, int64_t[::1] gathered):
    """The counts of a chunk straight from the kernel's arrays, on the settling thread (its
    amounts are added up where the results are built: Settler.keep_totals): the row's code is
    its compiled policy index + 1 (`policy`, -1 for none), its status the kernel's code;
    counts[code, status] += 1 and its cap-hit byte goes to the last column of sums[code,
    status]. An ok row of a policy whose year has several versions (`versioned[code]`) marks
    its key slot with its version's bit (`version_bits[slot[i]] |= version_bit[code]`: the
    persons of each version, without gathering them); every row not ok is written to
    `gathered`, and their count is returned. One pass over four small columns."""
    cdef Py_ssize_t n = policy.shape[0], i
    cdef int64_t k = 0, g, sl, last = sums.shape[2] - 1, stride = sums.shape[2]
    cdef int32_t p = 0, s = 0, policies = <int32_t>counts.shape[0], statuses = <int32_t>counts.shape[1]
    cdef int64_t bit_slots = version_bits.shape[0]
    cdef int64_t* count_base
    cdef int64_t* sum_base
    cdef bint bad = False
    if not (status.shape[0] == n and cap_hit.shape[0] == n and slot.shape[0] == n and gathered.shape[0] >= n
            and sums.shape[0] == counts.shape[0] and sums.shape[1] == counts.shape[1] and sums.shape[2] >= 1
            and versioned.shape[0] >= counts.shape[0] and version_bit.shape[0] >= counts.shape[0]):
        raise ValueError("chunk_tally: inconsistent shapes")
    if n == 0:
        return 0
    count_base = &counts[0, 0]
    sum_base = &sums[0, 0, 0]
    with nogil:
        for i in range(n):
            p = policy[i] + 1
            s = status[i]
            if <uint32_t>p >= <uint32_t>policies or <uint32_t>s >= <uint32_t>statuses:
                bad = True
                break
            g = p * statuses + s
            count_base[g] += 1
            sum_base[g * stride + last] += cap_hit[i]
            if s != ok:
                gathered[k] = i
                k += 1
            elif versioned[p]:
                sl = slot[i]
                if <uint64_t>sl >= <uint64_t>bit_slots:
                    bad = True
                    break
                version_bits[sl] |= version_bit[p]
    if bad:
        raise ValueError(f"chunk_tally: row {i} (policy code {p}, status {s}) outside the counts or the slots")
    return k
