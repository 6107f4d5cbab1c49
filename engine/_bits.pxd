# cython: language_level=3
"""Arrow bitmaps (validity, booleans): bit i of a byte array, least significant bit first.
Declared here so that every module reads them the same way (inline: no module of its own)."""
from libc.stdint cimport int64_t, uint8_t


cdef inline bint bit_at(const uint8_t* bits, int64_t i) noexcept nogil:
    return (bits[i >> 3] >> (i & 7)) & 1
