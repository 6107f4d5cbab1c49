# cython: language_level=3
"""Timestamps to calendar dates (proleptic Gregorian, as datetime.date and Arrow count them),
inline: the one home of the arithmetic that the column passes and status_detail share."""
from libc.stdint cimport int64_t

cdef inline int64_t day_of_micros(int64_t micros) noexcept nogil:
    """Days since 1970-01-01 of a timestamp[us], rounded down (before 1970 too)."""
    cdef int64_t day_us = <int64_t>86400 * 1000000
    cdef int64_t day = micros // day_us
    if micros % day_us < 0:
        day -= 1
    return day


cdef inline void civil_from_days(int64_t day, int64_t* year, int64_t* month, int64_t* dom) noexcept nogil:
    """Year, month (1-12) and day of month of a day since 1970-01-01 (H. Hinnant's
    civil_from_days, valid over the whole int64 range that matters here)."""
    cdef int64_t z = day + 719468, era, doe, yoe, doy, mp
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    dom[0] = doy - (153 * mp + 2) // 5 + 1
    month[0] = mp + 3 if mp < 10 else mp - 9
    year[0] = yoe + era * 400 + (1 if month[0] <= 2 else 0)
