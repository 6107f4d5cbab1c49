# cython: boundscheck=False, wraparound=False, initializedcheck=False
"""Clearing's per-row work over a year's claims: the hashes that split them by person
and find repeated claim ids, in C over Arrow's buffers (no Python object per row).

Why here and not in DuckDB: at 100 M claims DuckDB's hash group-by of every claim id
spilled to disk and the partition phase took four minutes; a 64-bit hash per row in
one pass, one sort of the hashes and a small set of the repeated ones take seconds,
and memory is 9 bytes per claim. The hash is the claim-id table's (engine._hashing),
seeded differently for persons so that the split and the claim ids are independent."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.stdlib cimport calloc, free

import numpy as np

from engine._hashing cimport hash_seeded

#: Seeds of the two uses (any fixed values; changing one changes every partition).
CLAIM_SEED = 0
PERSON_SEED = 0x9E3779B97F4A7C15


def hash_utf8(const int32_t[::1] offsets, const uint8_t[::1] data, uint64_t seed, uint64_t[::1] out):
    """out[i] = hash of string i (offsets[i]:offsets[i + 1] of data); the caller masks nulls.

    `offsets` has len(out) + 1 entries, already shifted to the array's offset."""
    cdef Py_ssize_t i, n = out.shape[0]
    cdef const uint8_t* p = &data[0] if data.shape[0] else NULL
    if offsets.shape[0] != n + 1:
        raise ValueError(f"offsets has {offsets.shape[0]} entries for {n} strings")
    if n and offsets[n] > data.shape[0]:
        raise ValueError("offsets point past the data")
    with nogil:
        for i in range(n):
            out[i] = hash_seeded(p + offsets[i], offsets[i + 1] - offsets[i], seed)


def buckets_of(const uint64_t[::1] hashes, uint16_t buckets, uint16_t[::1] out):
    """out[i] = hashes[i] mod buckets (the bucket of a person)."""
    cdef Py_ssize_t i, n = hashes.shape[0]
    if buckets == 0:
        raise ValueError("no buckets")
    with nogil:
        for i in range(n):
            out[i] = <uint16_t>(hashes[i] % buckets)


cdef inline uint64_t mix(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    return h


def in_set(const uint64_t[::1] values, const uint64_t[::1] keys):
    """Boolean array: values[i] is one of `keys` (a few, against many values).

    An open-addressing table of twice the keys' count, probed once per value: one pass
    over 100 M values in well under a second, where np.isin sorts them all."""
    cdef Py_ssize_t i, n = values.shape[0], k = keys.shape[0]
    cdef uint64_t size = 16, mask, slot, v
    while size < <uint64_t>(2 * k):
        size <<= 1
    mask = size - 1
    cdef uint64_t* table = <uint64_t*>calloc(size, sizeof(uint64_t))
    cdef uint8_t* used = <uint8_t*>calloc(size, 1)
    if table == NULL or used == NULL:
        free(table)
        free(used)
        raise MemoryError()
    result = np.zeros(n, dtype=np.bool_)
    cdef uint8_t[::1] r = result.view(np.uint8)
    try:
        with nogil:
            for i in range(k):
                v = keys[i]
                slot = mix(v) & mask
                while used[slot] and table[slot] != v:
                    slot = (slot + 1) & mask
                used[slot] = 1
                table[slot] = v
            for i in range(n):
                v = values[i]
                slot = mix(v) & mask
                while used[slot]:
                    if table[slot] == v:
                        r[i] = 1
                        break
                    slot = (slot + 1) & mask
    finally:
        free(table)
        free(used)
    return result
